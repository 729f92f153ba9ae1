"""One streamed choice's text -> OpenAI-shaped content and tool-call deltas.

Each call's first delta carries its index, id, type and name; its arguments follow in
pieces as the model writes them. In auto mode a call is announced once its name is
complete, so a `<tool_call>` block that never names a function sends nothing.
"""

from __future__ import annotations

from frontend.responses import FunctionDelta, ToolCallDelta
from frontend.tool_calls import (
    HERMES_CLOSE,
    HERMES_OPEN,
    ToolPlan,
    hermes_call,
    new_call,
    scan_calls,
)


class ToolStreamer:
    """Feed a choice's text deltas; get (content, tool-call deltas) to send."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self.ids: list[str] = []  # one per call announced so far
        self.sent_args: list[int] = []  # characters of each call's arguments sent
        self.content_end = 0  # auto: text[:content_end] went out as content (or calls)
        self.in_call = False  # auto: inside an unclosed <tool_call>
        self.closed: list[tuple[str, str]] = []  # auto: (name, arguments) of closed calls

    @property
    def called(self) -> bool:
        return bool(self.ids)

    def feed(self, text: str, final: bool) -> tuple[str, list[ToolCallDelta]]:
        self.text += text
        if self.plan.mode == "named":
            return "", self._diff([(self.plan.named or "", self.text)])
        if self.plan.mode == "required":
            return "", self._diff(scan_calls(self.text, "parameters"))
        return self._auto(final)

    def _diff(self, calls: list[tuple[str, str]]) -> list[ToolCallDelta]:
        """Deltas taking the client from what it has to `calls`."""
        out = []
        for index, (name, args) in enumerate(calls):
            if index == len(self.ids):
                self.ids.append(new_call(name, "").id)
                self.sent_args.append(0)
                head = FunctionDelta(name, args)
                out.append(ToolCallDelta(index, head, self.ids[index], "function"))
            elif len(args) > self.sent_args[index]:
                piece = FunctionDelta(arguments=args[self.sent_args[index] :])
                out.append(ToolCallDelta(index, piece))
            self.sent_args[index] = len(args)
        return out

    def _auto(self, final: bool) -> tuple[str, list[ToolCallDelta]]:
        content, deltas = "", []
        while True:
            rest = self.text[self.content_end :]
            if self.in_call:
                close = rest.find(HERMES_CLOSE)
                if close < 0 and not final:
                    deltas += self._diff(self.closed + scan_calls(rest, "arguments")[:1])
                    break
                body = rest if close < 0 else rest[:close]
                call = hermes_call(body)
                if call is None and len(self.ids) > len(self.closed):
                    call = scan_calls(body, "arguments")[0]  # announced: keep what was sent
                if call is not None:
                    self.closed.append(call)
                    deltas += self._diff(self.closed)
                self.content_end += len(rest) if close < 0 else close + len(HERMES_CLOSE)
                self.in_call = False
                continue
            start = rest.find(HERMES_OPEN)
            if start >= 0:
                if not self.called:  # text between or after calls is not content
                    content += rest[:start]
                self.content_end += start + len(HERMES_OPEN)
                self.in_call = True
                continue
            # hold back what may be the start of a <tool_call> tag
            keep = 0 if final else _partial_tag(rest)
            if not self.called:
                content += rest[: len(rest) - keep]
            self.content_end += len(rest) - keep
            break
        return content, deltas


def _partial_tag(text: str) -> int:
    """Length of the longest suffix of `text` that begins HERMES_OPEN."""
    for size in range(min(len(text), len(HERMES_OPEN) - 1), 0, -1):
        if HERMES_OPEN.startswith(text[-size:]):
            return size
    return 0

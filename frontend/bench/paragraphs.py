"""Paragraphs for the `repeat` dataset: a copy-heavy workload, where n-gram speculation
should shine (the output restates text the prompt already holds). Written for duet."""

from __future__ import annotations

PARAGRAPHS = (
    "The lighthouse keeper climbed the narrow stairs every evening at dusk. He trimmed the "
    "wick, polished the great lens, and wrote the weather in a leather book. Ships passed "
    "far out on the grey water, and none of them knew his name, but each one steered by "
    "the light he kept burning until the sun came up again over the cliffs.",
    "To bake a simple loaf, mix flour, water, salt and a little yeast until the dough "
    "holds together. Knead it for ten minutes, then leave it covered in a warm place until "
    "it has doubled in size. Shape it gently, let it rise once more, and bake it in a hot "
    "oven until the crust is brown and the bottom sounds hollow when tapped.",
    "The train left the valley station a few minutes late. It climbed through pine forests "
    "and over stone bridges, past farms where cows lifted their heads to watch it go. By "
    "noon the passengers could see snow on the peaks ahead, and the conductor walked "
    "through the carriages announcing that lunch would be served in the dining car.",
    "Copper is a soft, reddish metal that conducts heat and electricity very well. People "
    "have used it for thousands of years, first for tools and ornaments and later for "
    "coins, pipes and wires. Left in the open air it slowly turns green, as the roofs of "
    "many old buildings show, because a thin layer of copper salts forms on its surface.",
    "Owls hunt mostly at night. Their large eyes gather what little light there is, and "
    "their ears, set at slightly different heights, let them locate a mouse by sound "
    "alone. Soft edges on their feathers muffle the noise of their wings, so that their "
    "prey rarely hears them coming until it is far too late to run away.",
    "The committee met on Tuesday to review the budget for the coming year. After a long "
    "discussion, the members agreed to increase funding for the library, repair the roof "
    "of the community hall, and set aside a small reserve for emergencies. The chair "
    "thanked everyone for their patience and closed the meeting shortly after nine.",
)

INSTRUCTION = "Repeat the following paragraph exactly, word for word.\n\nParagraph:\n"
CUE = "\n\nThe same paragraph, repeated exactly:\n"

"""A synthetic inspection data set in the MVTec AD layout: textured surfaces and machined parts.

Texture classes are cut from photographs bundled with scikit-image (nothing is
downloaded): random crops, scales, rotations and flips of one material, as a
line camera sees a web of it. Object classes are drawn procedurally: one part
on a background, placed, turned and lit a little differently each time.

Every image is made the same way, good or not:

    scene (float RGB in [0, 1]) -> defect (changes the scene, gives its mask) -> camera -> uint8

so only the defect sets a defect image apart from a good one: gain, gamma,
white balance, light fall-off and sensor noise are drawn from the same ranges
for both, and a global statistic cannot tell them apart. Defect severity is
skewed towards the subtle end (small, low-contrast), with obvious ones mixed
in, so that methods differ in what they find.

Each image draws from its own random streams (scene, defect, camera), keyed
by (seed, class, split, category, index): the same seed gives the same files
whatever classes or counts are asked for. The defect has a stream of its own,
so a defect rendered on a scene changes that scene only where its mask says
(the tests check this against the scene's good twin).

The package, one job a module: `draw` (primitives), `defects` (holes, stains,
scratches), `textures` and `parts` (the scenes of each class), `images` (one
image: its streams and the camera) and `writer` (the data set on disk).
"""
from __future__ import annotations

from .draw import Rendered
from .images import ASPECT, CLASSES, DEFECTS, image_shape, render
from .writer import MARKER, generate

__all__ = ["ASPECT", "CLASSES", "DEFECTS", "MARKER", "Rendered", "generate", "image_shape", "render"]

"""The shapes world: determinism, the answer key against brute force, the detector on renders."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import ImageFilter

from data_pipeline import shapes


@pytest.mark.unit
def test_scenes_are_deterministic_and_valid():
    a, b = shapes.scene_for(1, "train", 5), shapes.scene_for(1, "train", 5)
    assert a == b and shapes.render(a).tobytes() == shapes.render(b).tobytes()
    assert shapes.scene_for(1, "train", 6) != a
    for i in range(200):
        s = shapes.scene_for(0, "train", i)
        assert 1 <= len(s.shapes) <= 3
        assert len({(x.row, x.col) for x in s.shapes}) == len(s.shapes)  # one shape per cell
        assert shapes.Scene.from_json(s.to_json()) == s


@pytest.mark.unit
def test_answer_key_matches_brute_force():
    for i in range(300):
        s = shapes.scene_for(0, "val", i)
        for q in shapes.questions(s):
            words = q.question.rstrip("?").split()
            if q.qtype == "count":
                assert q.answer == shapes.NUMBER_WORDS[len(s.shapes)]
            elif q.qtype == "colour":
                (m,) = [x for x in s.shapes if x.kind == words[-1]]
                assert q.answer == m.colour
            elif q.qtype == "shape":
                (m,) = [x for x in s.shapes if x.colour == words[-2]]
                assert q.answer == m.kind
            elif q.qtype == "position":
                (m,) = [x for x in s.shapes if x.name == " ".join(words[-2:])]
                names = {(0, 0): "top left", (1, 1): "center", (2, 2): "bottom right", (0, 1): "top center"}
                if (m.row, m.col) in names:
                    assert q.answer == names[(m.row, m.col)]
            else:
                a = [x for x in s.shapes if x.name == " ".join(words[2:4])][0]
                b = [x for x in s.shapes if x.name == " ".join(words[-2:])][0]
                truth = a.col < b.col if "left" in words else a.row < b.row
                assert q.answer == ("yes" if truth else "no")
        assert shapes.score_answer("top left", " Top left. ") and not shapes.score_answer("red", "blue")


@pytest.mark.unit
def test_detector_recovers_scenes_from_pixels():
    n, clean, blurred = 300, 0, 0
    for i in range(n):
        s = shapes.scene_for(2, "test", i)
        img = shapes.render(s)
        clean += shapes.detect(img).key() == s.key()
        blurred += shapes.detect(img.filter(ImageFilter.GaussianBlur(1.0))).key() == s.key()
    assert clean == n
    assert blurred >= 0.97 * n
    # an upscaled render (decoders may output 2x) is detected after resizing back
    s = shapes.scene_for(2, "test", 0)
    big = shapes.render(s).resize((128, 128))
    assert shapes.detect(big, image_size=64).key() == s.key()
    # a blank image has no shapes; a wrong scene does not match
    assert shapes.detect(np.full((64, 64, 3), 255, np.uint8)).shapes == ()
    m = shapes.scene_match(s, shapes.scene_for(2, "test", 1))
    assert m["exact"] == 0.0

"""Labels in every accepted form (lists, synonyms, dicts; sets refused), label files in real-world encodings,
numpy/torch thresholds, and Pillow's decompression-bomb limit with ``max_pixels``."""
import codecs

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg.errors import InvalidInputError, InvalidTypeError, OvsegError, PathNotFoundError
from ovseg.params import unit_interval
from ovseg.preprocess import load_image
from ovseg.text import parse_labels, read_label_file


def test_sets_are_refused_because_their_order_changes_label_indices():
    for labels in ({"cat", "dog"}, frozenset({"cat"})):
        with pytest.raises(InvalidTypeError, match="order changes between runs"):
            parse_labels(labels)
    with pytest.raises(InvalidTypeError, match="not a set"):
        parse_labels([{"sofa", "couch"}])  # which synonym names the class would be random


def test_dict_is_class_name_to_synonyms():
    ls = parse_labels({"sofa": ["couch", "settee"], "cat": "kitten; kitty", "floor": [], "sky": None})
    assert ls.names == ("sofa", "cat", "floor", "sky")
    assert ls.queries == ("sofa", "couch", "settee", "cat", "kitten", "kitty", "floor", "sky")
    assert ls.query_class == (0, 0, 0, 1, 1, 1, 2, 3)
    assert ls.synonyms() == {"sofa": ["sofa", "couch", "settee"], "cat": ["cat", "kitten", "kitty"],
                             "floor": ["floor"], "sky": ["sky"]}
    assert parse_labels({"sofa": "sofa"}).queries == ("sofa",)  # the name repeated as a synonym counts once
    with pytest.raises(InvalidTypeError, match="single class names"):
        parse_labels({"sofa; couch": "x"})
    with pytest.raises(InvalidInputError, match="duplicate label 'Cat'"):
        parse_labels({"cat": [], "Cat": []})
    with pytest.raises(InvalidTypeError, match="int"):
        parse_labels({"cat": 3})


def test_label_errors_are_ovseg_errors_and_builtin_errors():
    with pytest.raises(ValueError) as e:
        parse_labels(["cat", " "])
    assert isinstance(e.value, OvsegError)
    with pytest.raises(TypeError) as e:
        parse_labels("cat")
    assert isinstance(e.value, OvsegError)


@pytest.mark.parametrize("encode", [
    lambda t: t.encode("utf-8"),
    lambda t: codecs.BOM_UTF8 + t.encode("utf-8"),  # Windows Notepad's "UTF-8 with BOM"
    lambda t: t.encode("utf-16"),  # "Unicode" (UTF-16 with its byte-order mark)
    lambda t: t.replace("\n", "\r\n").encode("utf-8"),
])
def test_label_file_encodings_bom_and_comments(tmp_path, encode):
    text = "# my classes\ncafé ; coffee shop\n\n  床  # bed, in Chinese\nC#\n   # indented comment\nsky\n"
    p = tmp_path / "labels.txt"
    p.write_bytes(encode(text))
    labels = read_label_file(p)
    assert labels == ["café ; coffee shop", "床", "C#", "sky"]
    assert parse_labels(labels).names == ("café", "床", "C#", "sky")


def test_label_file_in_another_encoding_names_file_and_line(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("sky\ngrass\ncafé\n".encode("latin-1"))
    with pytest.raises(InvalidInputError) as e:
        read_label_file(p, option="--labels-file")
    msg = str(e.value)
    assert "--labels-file" in msg and str(p) in msg and "line 3" in msg and "0xe9" in msg and "UTF-8" in msg
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(InvalidInputError, match="has no labels"):
        read_label_file(empty)
    with pytest.raises(PathNotFoundError, match="missing.txt"):
        read_label_file(tmp_path / "missing.txt")


@pytest.mark.parametrize("value,expected", [
    (np.float32(0.25), 0.25), (np.float64(0.5), 0.5), (torch.tensor(0.75), 0.75), (np.array(0.1), 0.1),
    (1, 1.0), (0, 0.0), (torch.tensor(1), 1.0),
])
def test_thresholds_accept_numpy_and_torch_scalars(value, expected):
    assert unit_interval("threshold", value) == pytest.approx(expected)


@pytest.mark.parametrize("value,exc", [
    (True, InvalidTypeError), (np.bool_(False), InvalidTypeError), (torch.tensor(True), InvalidTypeError),
    (float("nan"), InvalidInputError), (np.float32("nan"), InvalidInputError), (1.01, InvalidInputError),
    ("0.2", InvalidTypeError), (torch.tensor([0.2, 0.3]), InvalidTypeError),
])
def test_thresholds_refuse_bools_nan_and_arrays(value, exc):
    with pytest.raises(exc, match="threshold"):
        unit_interval("threshold", value)


def test_max_pixels_lifts_pillows_limit_for_one_call_only(tmp_path, monkeypatch):
    p = tmp_path / "x.png"
    Image.fromarray(np.full((60, 50, 3), 7, np.uint8)).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 3000 pixels > 2 x 1000: Pillow refuses the file
    with pytest.raises(InvalidInputError) as e:
        load_image(p)
    assert "decompression-bomb" in str(e.value) and "50x60" in str(e.value) and "max_pixels" in str(e.value)
    assert load_image(p, max_pixels=3000).shape == (60, 50, 3)
    assert Image.MAX_IMAGE_PIXELS == 1000  # Pillow's global is as the user left it
    with pytest.raises(InvalidInputError, match="more than max_pixels=2,999"):
        load_image(p, max_pixels=2999)
    with pytest.raises(InvalidInputError, match="positive int"):
        load_image(p, max_pixels=0)

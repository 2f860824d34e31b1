"""Label parsing, templates, the synonym max, the threshold and the text-embedding cache."""
import pytest
import torch

from ovseg.segmenter import postprocess
from ovseg.text import get_templates, parse_labels


def test_parse_labels_synonyms_both_forms():
    ls = parse_labels(["horse", "grass; lawn", ["sky", "heaven"], "  tree  "])
    assert ls.names == ("horse", "grass", "sky", "tree")
    assert ls.queries == ("horse", "grass", "lawn", "sky", "heaven", "tree")
    assert ls.query_class == (0, 1, 1, 2, 2, 3)
    assert ls.has_synonyms


@pytest.mark.parametrize("labels,exc,needle", [
    ([], ValueError, "empty"),
    (["cat", "  "], ValueError, "'  '"),
    (["cat", ""], ValueError, "''"),
    (["cat", "Cat"], ValueError, "duplicate label 'Cat'"),
    (["cat", 3], TypeError, "3"),
    ("cat", TypeError, "'cat'"),
    (["cat", "dog; "], ValueError, "'dog; '"),
])
def test_parse_labels_rejects(labels, exc, needle):
    with pytest.raises(exc) as e:
        parse_labels(labels)
    assert needle in str(e.value)


def test_templates():
    t = get_templates("openai_imagenet")
    assert len(t) == 80 and t[0] == "a bad photo of a {}." and t[-1] == "a tattoo of the {}."
    assert get_templates(["a {} here"]) == ("a {} here",)
    with pytest.raises(ValueError, match="no_such"):
        get_templates("no_such")
    with pytest.raises(ValueError, match="placeholder|'\\{\\}'"):
        get_templates(["no placeholder"])


def test_postprocess_synonym_max_after_softmax():
    # queries: bg, bg-syn, cat ; classes: bg(0), cat(1)
    logits = torch.tensor([0.30, 0.29, 0.31]).view(3, 1, 1)
    labels, scores = postprocess(logits, (0, 0, 1), 2, logit_scale=40.0)
    p = torch.softmax(logits.view(-1) * 40, 0)
    assert scores[:, 0, 0].tolist() == pytest.approx([float(max(p[0], p[1])), float(p[2])])
    assert int(labels) == 1  # cat has the single largest query probability
    # without the synonym spreading the mass, the max over synonyms is what counts (not their sum)
    assert float(scores[0, 0, 0]) < float(p[0] + p[1])


def test_postprocess_threshold_sends_low_confidence_to_first_class():
    logits = torch.tensor([[0.0, 0.0], [0.5, 0.01]]).view(2, 1, 2)  # two pixels, two classes
    lab, scores = postprocess(logits, (0, 1), 2, logit_scale=10.0, threshold=0.0)
    assert lab.tolist() == [[1, 1]]
    lab, _ = postprocess(logits, (0, 1), 2, logit_scale=10.0, threshold=0.6)
    # pixel 0: p(cls1) = sigmoid(5) = 0.993 kept; pixel 1: p = sigmoid(0.1) = 0.525 < 0.6 -> class 0
    assert lab.tolist() == [[1, 0]]


def test_postprocess_ties_go_to_first_index():
    lab, _ = postprocess(torch.zeros(3, 2, 2), (0, 1, 2), 3)
    assert lab.eq(0).all()

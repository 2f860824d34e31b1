"""The COCO-Object converter follows the reference rule (GroupViT's, used by NACLIP and ProxyCLIP)."""
import numpy as np
from PIL import Image

from ovseg.eval.coco_object import COCO_THING_IDS, convert_coco_object, convert_mask


def test_raw_ids_to_coco_object():
    raw = np.array([[0, 12, 89, 91], [181, 255, 26, 10]], np.uint8)
    # things -> contiguous train id + 1 (0->1, 12->12 (train id 11), 89->80, 26->25, 10->11); stuff and 255 -> 0
    np.testing.assert_array_equal(convert_mask(raw), [[1, 12, 80, 0], [0, 0, 25, 11]])
    assert len(COCO_THING_IDS) == 80 and COCO_THING_IDS[11] == 12


def test_from_label_train_ids():
    tr = np.array([[0, 79, 80, 170, 255]], np.uint8)
    np.testing.assert_array_equal(convert_mask(tr, "labelTrainIds"), [[1, 80, 0, 0, 0]])


def test_converter_writes_instance_train_ids(tmp_path):
    ann = tmp_path / "annotations" / "val2017"
    ann.mkdir(parents=True)
    Image.fromarray(np.array([[0, 91], [255, 45]], np.uint8)).save(ann / "000000000139.png")
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(ann / "000000000139_labelTrainIds.png")  # ignored: raw exists
    assert convert_coco_object(str(tmp_path), progress=False) == 1
    out = np.array(Image.open(ann / "000000000139_instanceTrainIds.png"))
    np.testing.assert_array_equal(out, [[1, 0], [0, 41]])

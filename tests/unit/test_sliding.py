"""Sliding-window algebra: the mmseg grid, pad-to-multiple, overlap averaging, whole-image mode."""
import pytest
import torch
import torch.nn.functional as F

from ovseg.sliding import as_pair, pad_amounts, slide_inference, window_grid


def identity(crops):
    return crops  # logits at full window resolution: upsampling is the identity


@pytest.mark.parametrize("h,w", [(337, 501), (100, 80), (336, 336), (200, 700), (57, 1001)])
@pytest.mark.parametrize("pad", [None, 56])
def test_identity_model_reconstructs_input(h, w, pad):
    img = torch.randn(3, h, w)
    out, = slide_inference([img], identity, window=(336, 336), stride=(112, 112), pad_multiple=pad, batch_size=3)
    torch.testing.assert_close(out, img)


def test_padding_path_sees_padded_crops_and_crops_back():
    seen = []

    def model(crops):
        seen.append(tuple(crops.shape[-2:]))
        # a function of the padded position: row index of the padded window
        ramp = torch.arange(crops.shape[-2], dtype=torch.float32).view(1, 1, -1, 1).expand(crops.shape[0], 1, -1,
                                                                                         crops.shape[-1])
        return ramp.contiguous()

    out, = slide_inference([torch.zeros(3, 100, 130)], model, window=(336, 336), stride=(112, 112), pad_multiple=56)
    assert seen == [(112, 168)]  # 100 -> 112, 130 -> 168
    left, right, top, bottom = pad_amounts(100, 130, 56)
    assert (left, right, top, bottom) == (19, 19, 6, 6)
    torch.testing.assert_close(out[0, :, 0], torch.arange(top, top + 100, dtype=torch.float32))


def test_pad_amounts_rule():
    assert pad_amounts(336, 336, 56) == (0, 0, 0, 0)
    assert pad_amounts(301, 250, 56) == (15, 15, 17, 18)  # w: 250 -> 280 (15+15); h: 301 -> 336 (17+18)
    assert pad_amounts(10, 10, None) == (0, 0, 0, 0)


def test_window_grid_matches_mmseg_formula():
    boxes = window_grid(500, 375, (336, 336), (112, 112))
    ys = sorted({b[0] for b in boxes})
    xs = sorted({b[2] for b in boxes})
    assert ys == [0, 112, 164]  # h_grids = (500-336+111)//112+1 = 3; last shifted back to end at 500
    assert xs == [0, 39]  # w_grids = (375-336+111)//112+1 = 2; 112+336>375 -> shifted to 39
    assert all(b[1] - b[0] == 336 and b[3] - b[2] == 336 for b in boxes)
    # image smaller than the window: one window of the image's size
    assert window_grid(100, 200, (336, 336), (112, 112)) == [(0, 100, 0, 200)]


def test_overlaps_are_averaged():
    def const_per_window(crops):
        # every window predicts the x1 coordinate encoded in its first pixel
        return crops[:, :1, :1, :1].expand(-1, 1, crops.shape[-2], crops.shape[-1]).contiguous()

    w = 448
    img = torch.arange(w, dtype=torch.float32).view(1, 1, w).expand(3, 224, w).contiguous()
    out, = slide_inference([img], const_per_window, window=(224, 224), stride=(112, 112))
    # windows start at x = 0, 112, 224; column 150 is covered by windows at 0 and 112
    assert float(out[0, 0, 150]) == pytest.approx((0 + 112) / 2)
    assert float(out[0, 0, 50]) == 0.0
    assert float(out[0, 0, 400]) == 224.0


def test_low_resolution_logits_are_upsampled_bilinearly():
    def coarse(crops):
        return F.avg_pool2d(crops, 16)  # a 16x coarser grid, like CLIP tokens

    img = torch.randn(3, 224, 224)
    out, = slide_inference([img], coarse, window=None, stride=None)
    expected = F.interpolate(F.avg_pool2d(img[None], 16), size=(224, 224), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(out, expected)


def test_whole_image_mode_and_batches_across_images():
    calls = []

    def model(crops):
        calls.append(crops.shape[0])
        return crops

    imgs = [torch.randn(3, 50, 60), torch.randn(3, 50, 60), torch.randn(3, 70, 40)]
    outs = slide_inference(imgs, model, window=None, stride=None, batch_size=8)
    for o, i in zip(outs, imgs):
        torch.testing.assert_close(o, i)
    assert sorted(calls) == [1, 2]  # same-size windows of different images share a batch


def test_batch_size_controls_forward_calls():
    calls = []

    def model(crops):
        calls.append(crops.shape[0])
        return crops

    slide_inference([torch.randn(3, 500, 375)], model, window=(336, 336), stride=(112, 112), batch_size=4)
    assert calls == [4, 2]


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-3, ValueError), ((1, 2, 3), TypeError), ("x", TypeError),
                                     (True, TypeError)])
def test_as_pair_rejects(bad, exc):
    with pytest.raises(exc, match="window"):
        as_pair(bad, "window")


def test_native_logits_stay_on_the_model_grid_and_group_keys_split_batches():
    # whole-image mode with ``native``: the forward's grid is kept (no resize to the image); group keys keep
    # images with different keys out of one batch even when their sizes agree
    imgs = [torch.randn(3, 40, 60), torch.randn(3, 40, 60), torch.randn(3, 40, 60), torch.randn(3, 30, 50)]
    calls = []

    def model(crops):
        calls.append(crops.shape[0])
        return crops[:, :2, ::4, ::4] * 2  # a 4x coarser grid

    out = slide_inference(imgs, model, window=None, stride=None, batch_size=8, native=True,
                          group_keys=["a", "b", "a", "a"])
    for img, o in zip(imgs, out):
        torch.testing.assert_close(o, img[:2, ::4, ::4] * 2)  # not resized
    assert sorted(calls) == [1, 1, 2]  # (img 0, img 2) together; img 1 alone (key); img 3 alone (size)
    resized = slide_inference(imgs[:1], model, window=None, stride=None)[0]
    assert resized.shape == (2, 40, 60)  # without ``native`` the logits are resized to the image
    with pytest.raises(ValueError, match="whole-image"):
        slide_inference(imgs, model, window=(20, 20), stride=(10, 10), native=True)
    with pytest.raises(ValueError, match="padding"):
        slide_inference(imgs, model, window=None, stride=None, native=True, pad_multiple=56)
    with pytest.raises(ValueError, match="group keys"):
        slide_inference(imgs, model, window=None, stride=None, group_keys=["a"])

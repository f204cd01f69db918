"""watch(log=[..., "feature_maps"]): conv channel grids and sequence heat maps at their own
cadence, and watch(log_inputs=True): the first batch as a grid, checked like inspect_data."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from introspect import ConfigError, watch
from introspect.live import DEFAULT_LOG
from introspect.probes.feature_maps import MAX_CHANNELS, sample_picker
from tests.support import QUIET
from tests.support.events import read_events, text_of
from tests.support.training import train
from tests.support.zoo import PackedLSTM, SeedCNN


def bce(out, y):
    return nn.functional.binary_cross_entropy_with_logits(out[:, 0], y)


def image_batch(n: int = 4, size: int = 32):
    return torch.rand(n, 3, size, size), torch.randint(0, 2, (n,)).float()


def image_steps(acc, tag: str) -> list[int]:
    return [e.step for e in acc.Images(tag)] if tag in acc.Tags()["images"] else []


def png(event) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("L")).astype(int)


def _feature_maps_probe(w):
    return next(p for p in w.probes if p.name == "feature_maps")


def test_feature_maps_are_on_by_default():
    assert "feature_maps" in DEFAULT_LOG


def test_conv_layers_only_at_the_image_cadence(tmp_path, seed_cnn):
    with watch(seed_cnn, str(tmp_path), every=1, image_every=3, **QUIET) as w:
        train(seed_cnn, image_batch, bce, steps=7)
    acc = read_events(tmp_path)
    maps = {t for t in acc.Tags()["images"] if t.startswith("feature_maps/")}
    assert maps == {"feature_maps/conv1", "feature_maps/conv2"}  # not pools, dropout, linears
    assert image_steps(acc, "feature_maps/conv1") == [0, 3, 6]
    assert image_steps(acc, "feature_maps/conv2") == [0, 3, 6]
    assert _feature_maps_probe(w).maps == {}  # nothing kept after the steps were written


def test_default_image_cadence_is_ten_times_every(tmp_path, seed_cnn):
    with watch(seed_cnn, str(tmp_path), every=2, **QUIET) as w:
        train(seed_cnn, image_batch, bce, steps=21)
    assert w.image_every == 20
    assert image_steps(read_events(tmp_path), "feature_maps/conv1") == [0, 20]


def test_the_grid_is_the_first_samples_channels_each_scaled_on_its_own(tmp_path, seed_cnn):
    torch.manual_seed(1)
    x, y = image_batch(3)
    x[0, :, :, :16] *= 10.0  # give the first sample's channels very different scales from the rest
    with torch.no_grad():
        expected = seed_cnn.conv1(x)[0]  # step 0 uses these weights
    with watch(seed_cnn, str(tmp_path), every=1, **QUIET):
        train(seed_cnn, lambda: (x, y), bce, steps=1)
    event = read_events(tmp_path).Images("feature_maps/conv1")[0]
    # 32 channels of 30x30 in a 6x6 grid with 1 pixel of padding.
    assert (event.width, event.height) == (6 * 31 + 1, 6 * 31 + 1)
    grid = png(event)
    for c in (0, 7, 31):
        row, col = divmod(c, 6)
        cell = grid[1 + 31 * row : 31 * (row + 1), 1 + 31 * col : 31 * (col + 1)]
        channel = expected[c]
        scaled = ((channel - channel.min()) / (channel.max() - channel.min()) * 255).numpy()
        assert np.abs(cell - scaled).max() <= 1.01, f"channel {c}"
        assert cell.min() == 0 and cell.max() == 255  # own min and max


def test_channels_are_capped(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 100, 3), nn.Flatten(), nn.LazyLinear(1))
    model(torch.rand(1, 3, 8, 8))  # materialise the lazy layer
    with watch(model, str(tmp_path), every=1, **QUIET):
        train(model, lambda: image_batch(2, 8), bce, steps=1)
    event = read_events(tmp_path).Images("feature_maps/0")[0]
    # 6x6 maps are enlarged 5x to 30x30; 64 of the 100 channels in an 8x8 grid.
    assert MAX_CHANNELS == 64
    assert (event.width, event.height) == (8 * 31 + 1, 8 * 31 + 1)


class SequenceNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, padding=1)
        self.lstm = nn.LSTM(6, 16, batch_first=True)
        self.head = nn.Linear(16, 1)

    def forward(self, x):  # x: (N, 4, T)
        h = self.conv(x)
        out, _ = self.lstm(h.transpose(1, 2))
        return self.head(out[:, -1])


def test_sequences_become_heat_maps(tmp_path):
    torch.manual_seed(0)
    model = SequenceNet()
    with watch(model, str(tmp_path), every=1, **QUIET):
        train(model, lambda: (torch.randn(3, 4, 10), torch.rand(3)), bce, steps=2)
    acc = read_events(tmp_path)
    maps = {t for t in acc.Tags()["images"] if t.startswith("feature_maps/")}
    assert maps == {"feature_maps/conv", "feature_maps/lstm/0"}  # the sequence, not h_n / c_n
    conv, lstm = acc.Images("feature_maps/conv")[0], acc.Images("feature_maps/lstm/0")[0]
    # conv: 6 channels x 10 steps, enlarged 3x; lstm: 10 steps x 16 features, enlarged 2x.
    assert (conv.height, conv.width) == (18, 30)
    assert (lstm.height, lstm.width) == (20, 32)


def test_sequence_first_modules_pick_the_first_sample():
    lstm = nn.LSTM(4, 5)  # (T, N, F)
    output = torch.randn(7, 3, 5)
    kind, picked = sample_picker(lstm)(output)
    assert kind == "heatmap" and torch.equal(picked, output[:, 0])
    assert sample_picker(nn.Linear(2, 2)) is None and sample_picker(nn.MaxPool2d(2)) is None


def test_a_packed_sequence_gives_its_first_samples_rows():
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    torch.manual_seed(0)
    for lstm in (nn.LSTM(4, 6, batch_first=True), nn.GRU(4, 6)):
        x = torch.randn(3, 5, 4) if lstm.batch_first else torch.randn(5, 3, 4)
        # unsorted lengths: the first sample is neither the longest nor first in the packed rows
        packed = pack_padded_sequence(x, [2, 5, 3], batch_first=lstm.batch_first, enforce_sorted=False)
        output = lstm(packed)
        kind, picked = sample_picker(lstm)(output)
        padded, lengths = pad_packed_sequence(output[0], batch_first=True)
        assert kind == "heatmap" and lengths[0] == 2
        assert torch.equal(picked, padded[0, :2])  # its 2 steps x 6 features, no padding
        # the packed rows alone cannot say which are the first sample's
        assert sample_picker(lstm)(output[0].data) is None


def packed_batch():
    from torch.nn.utils.rnn import pack_padded_sequence

    x = torch.randn(3, 10, 4)
    return pack_padded_sequence(x, [10, 6, 3], batch_first=True), torch.rand(3)


def test_packed_sequences_get_heat_maps_under_watch(tmp_path):
    torch.manual_seed(0)
    model = PackedLSTM(hidden=16, outputs=1)
    with watch(model, str(tmp_path), every=1, **QUIET):
        train(model, packed_batch, bce, steps=2)
    acc = read_events(tmp_path)
    lstm = acc.Images("feature_maps/lstm/0")[0]
    assert (lstm.height, lstm.width) == (20, 32)  # the first sample's 10 steps x 16 features, 2x


def test_feature_maps_off(tmp_path, seed_cnn):
    with watch(seed_cnn, str(tmp_path), every=1, log=("activations", "grads"), **QUIET):
        train(seed_cnn, image_batch, bce, steps=2)
    assert not [t for t in read_events(tmp_path).Tags()["images"] if t.startswith("feature_maps/")]


def test_image_steps_alone_do_not_log_histograms(tmp_path, seed_cnn):
    """image_every need not be a multiple of every: an image step is not a histogram step."""
    with watch(seed_cnn, str(tmp_path), every=4, image_every=3, check_every=0, **QUIET):
        train(seed_cnn, image_batch, bce, steps=7)
    acc = read_events(tmp_path)
    assert image_steps(acc, "feature_maps/conv1") == [0, 3, 6]
    assert [e.step for e in acc.Histograms("activations/conv1")] == [0, 4]


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_bad_image_every(seed_cnn, value):
    with pytest.raises(ConfigError, match="image_every"):
        watch(seed_cnn, None, image_every=value)


def test_training_is_unchanged(tmp_path):
    from tests.support.training import assert_same_losses, assert_same_state

    def run(watched: bool):
        torch.manual_seed(0)
        model = SeedCNN()
        torch.manual_seed(1)
        if not watched:
            return model, train(model, image_batch, bce, steps=3)
        with watch(model, str(tmp_path), every=1, image_every=1, log_inputs=True, **QUIET):
            return model, train(model, image_batch, bce, steps=3)

    (a, la), (b, lb) = run(False), run(True)
    assert_same_losses(la, lb)
    assert_same_state(a, b)


# --------------------------------------------------------------------------- log_inputs
def test_first_batch_is_logged_and_checked(tmp_path, seed_cnn):
    x, y = image_batch(6)
    x[1] = 0.0  # an all-black image
    x[4] = x[4] * 255  # a 0-255 image
    batches = iter([(x, y)] + [image_batch(6) for _ in range(3)])
    with watch(seed_cnn, str(tmp_path), log_inputs=True, **QUIET) as w:
        train(seed_cnn, lambda: next(batches), bce, steps=3)
    acc = read_events(tmp_path)
    inputs = acc.Images("data/inputs")
    assert [e.step for e in inputs] == [0]  # the first batch only
    assert (inputs[0].width, inputs[0].height) == (6 * 34 + 2, 34 + 2)
    found = {a.kind: a for a in w.alerts}
    assert set(found) == {"data_constant", "data_range"}
    assert found["data_constant"].where == "input sample 1" and found["data_range"].where == "input sample 4"
    assert "data_range" in text_of(acc, "diagnostics/alerts")[-1]


def test_log_inputs_is_off_by_default_and_skips_non_images(tmp_path, seed_cnn):
    with watch(seed_cnn, str(tmp_path / "a"), **QUIET):
        train(seed_cnn, image_batch, bce, steps=1)
    assert "data/inputs" not in read_events(tmp_path / "a").Tags()["images"]
    mlp = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 1))
    with watch(mlp, str(tmp_path / "b"), log_inputs=True, **QUIET) as w:
        train(mlp, lambda: (torch.zeros(5, 8), torch.rand(5)), bce, steps=1)
    assert "data/inputs" not in read_events(tmp_path / "b").Tags()["images"]
    assert w.alerts == []


class HistogramsOnly:
    """A SummaryWriter-like wrapper without add_image (e.g. a user's own logger)."""

    def __init__(self, logdir) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(logdir))
        self.add_histogram_raw = self._writer.add_histogram_raw
        self.add_scalar = self._writer.add_scalar
        self.add_text = self._writer.add_text
        self.flush = self._writer.flush


def test_a_writer_without_add_image_gets_no_feature_maps_and_no_warning(tmp_path, seed_cnn, quiet):
    writer = HistogramsOnly(tmp_path)
    with watch(seed_cnn, writer, every=1, **QUIET) as w:
        train(seed_cnn, image_batch, bce, steps=2)
    writer._writer.close()
    assert _feature_maps_probe(w).pickers == {}
    assert "activations/conv1" in read_events(tmp_path).Tags()["histograms"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_feature_maps_and_inputs_on_cuda(tmp_path):
    torch.manual_seed(0)
    model = SeedCNN().cuda()
    with watch(model, str(tmp_path), every=1, log_inputs=True, **QUIET):
        train(model, lambda: tuple(t.cuda() for t in image_batch()), bce, steps=2)
    images = set(read_events(tmp_path).Tags()["images"])
    assert {"feature_maps/conv1", "feature_maps/conv2", "data/inputs"} <= images

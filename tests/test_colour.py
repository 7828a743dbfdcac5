"""Colour images: the icon folder's build, a folder's held-out split, the metrics that need no
network (the sliced Wasserstein distance, near-copies) against cases with known answers, and
the FID Inception weights' fetch against a server on 127.0.0.1."""
import http.server
import json
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from smol_diffusion import features
from smol_diffusion.checkpoint import load_checkpoint
from smol_diffusion.cli import main as cli_main
from smol_diffusion.config import DataConfig
from smol_diffusion.data import HELD_OUT, folder_split, make_dataset, to_model_range
from smol_diffusion.evaluate import default_metrics, evaluate
from smol_diffusion.files import download
from smol_diffusion.icons import OXYGEN, build_icons, distinct, icon_sources
from smol_diffusion.metrics import copies, laplacian_pyramid, nearest, sliced_wasserstein
from smol_diffusion.training import train

# ---- the icon folder ------------------------------------------------------------------------


def fake_theme(root: Path) -> Path:
    """A theme laid out as Oxygen's: a red icon with a transparent half at 64 and 16 px, a blue
    one only at 16 px (too small for 32), and a copy of the red one under another name."""
    def icon(path, size, colour):
        img = Image.new("RGBA", (size, size), colour + (255,))
        img.paste((0, 0, 0, 0), (0, 0, size // 2, size))  # left half transparent
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
    icon(root / "64x64" / "apps" / "red.png", 64, (255, 0, 0))
    icon(root / "16x16" / "apps" / "red.png", 16, (255, 0, 0))
    icon(root / "16x16" / "apps" / "blue.png", 16, (0, 0, 255))
    icon(root / "64x64" / "places" / "also-red.png", 64, (255, 0, 0))
    (root / "index.theme").write_text("not a size folder")
    return root


def test_icons_are_built_once_each_on_white_and_never_over_a_folder(tmp_path):
    theme = fake_theme(tmp_path / "theme")
    assert list(icon_sources(theme, 32)) == ["apps/red", "places/also-red"]
    assert icon_sources(theme, 16)["apps/red"].parts[-3] == "64x64"  # the largest
    assert build_icons(tmp_path / "out", 32, theme) == 1  # the copy is dropped
    (only,) = (tmp_path / "out").iterdir()
    assert only.name == "apps_red.png"
    img = np.asarray(Image.open(only))
    assert img.shape == (32, 32, 3)
    assert (img[:, :12] == 255).all() and (img[:, 20:] == [255, 0, 0]).all()  # on white
    with pytest.raises(FileExistsError, match="already exists"):
        build_icons(tmp_path / "out", 32, theme)
    with pytest.raises(FileNotFoundError, match="apt-get install oxygen-icon-theme"):
        build_icons(tmp_path / "other", 32, tmp_path / "no-theme")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "theme"]  # no temporary left


def test_distinct_drops_near_copies_and_keeps_the_first():
    a = torch.full((3, 8, 8), 100, dtype=torch.uint8)
    near, far = a + 1, a + 40  # 1 and 40 grey levels away
    assert distinct(torch.stack([a, near, far, a])) == [0, 2]


@pytest.mark.skipif(not OXYGEN.is_dir(), reason="Debian's oxygen-icon-theme is not installed")
def test_the_oxygen_icons_build_into_a_colour_folder(tmp_path):
    n = build_icons(tmp_path / "icons", 32, OXYGEN, limit=40)
    assert 30 <= n <= 40
    data = make_dataset(DataConfig(dataset="folder", root=str(tmp_path / "icons"),
                                   cache_dir=str(tmp_path / "cache")), 32, 3, progress=False)
    x = data.images.float()
    assert x.shape == (n, 3, 32, 32)
    assert (x[:, 0] - x[:, 2]).abs().mean() > 5  # colour, not grey


def test_cli_icons_prints_count_and_licence(tmp_path, capsys):
    cli_main(["icons", "--out", str(tmp_path / "out"), "--size", "32", "--source",
              str(fake_theme(tmp_path / "theme"))])
    out = capsys.readouterr().out
    assert "1 icons, 32x32" in out and "LGPL-3+" in out


# ---- a folder's held-out split ---------------------------------------------------------------


def test_a_folder_holds_out_a_tenth_by_file_name(tmp_path):
    names = [tmp_path / f"{i:03d}.png" for i in range(400)]
    test = folder_split(tmp_path, names, "test")
    train = folder_split(tmp_path, names, "train")
    assert sorted(test + train) == folder_split(tmp_path, names, "all") == list(range(400))
    assert abs(len(test) / 400 - HELD_OUT) < 0.05
    # a file stays on its side when others come and go
    assert folder_split(tmp_path, names[::2], "test") == [i // 2 for i in test if i % 2 == 0]


def test_a_folder_too_small_for_a_test_split_says_so(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    held = folder_split(tmp_path, [tmp_path / "a.png"], "test")
    split = "train" if held else "test"  # whichever side is empty
    with pytest.raises(FileNotFoundError, match=f"the {split} split .* is empty"):
        make_dataset(DataConfig(dataset="folder", root=str(tmp_path), split=split,
                                cache_dir=str(tmp_path / "cache")), 8, 3, progress=False)


# ---- the sliced Wasserstein distance -------------------------------------------------------

def textures(n: int, seed: int) -> torch.Tensor:
    """n colour images (n, 3, 32, 32) in [-1, 1] of one distribution: smooth random blobs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    return (F.interpolate(x, size=32, mode="bilinear", align_corners=False) * 0.5).clamp(-1, 1)


def test_the_pyramid_is_progans():
    """Its levels halve down to 8 px; a level down is cv2.pyrDown as ProGAN writes it (their
    5x5 binomial filter, mirrored borders, every second pixel); the finest level is the image
    less the coarser one brought back up (pyrUp)."""
    from scipy.ndimage import convolve
    x = torch.rand(4, 3, 28, 28) * 255
    levels = laplacian_pyramid(x)
    assert [level.shape[-1] for level in levels] == [28, 14]
    assert [level.shape[-1] for level in laplacian_pyramid(torch.rand(1, 3, 64, 64))] == \
        [64, 32, 16, 8]
    k = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]) / 256.0
    down = convolve(x.double().numpy(), k[None, None], mode="mirror")[:, :, ::2, ::2]
    np.testing.assert_allclose(levels[1].double().numpy(), down, atol=1e-3)
    up = np.zeros(x.shape)
    up[:, :, ::2, ::2] = down
    up = convolve(up, 4 * k[None, None], mode="mirror")
    np.testing.assert_allclose(levels[0].double().numpy(), x.double().numpy() - up, atol=1e-3)


def test_swd_of_a_set_against_itself_is_zero():
    x = textures(64, 0)
    got = sliced_wasserstein(x, x)
    assert got["value"] == 0 and set(got["levels"]) == {32, 16, 8} and got["n"] == 64


def test_swd_grows_with_a_colour_shift_and_with_blur():
    real, other = textures(200, 0), textures(200, 1)
    floor = sliced_wasserstein(other, real)["value"]
    shifted = [sliced_wasserstein((other + torch.tensor([s, 0, -s]).view(1, 3, 1, 1))
                                  .clamp(-1, 1), real)["value"] for s in (0.1, 0.2, 0.4)]
    assert floor < shifted[0] < shifted[1] < shifted[2]
    assert shifted[0] > 3 * floor
    blurred = sliced_wasserstein(F.avg_pool2d(other, 3, 1, 1, count_include_pad=False), real)
    assert blurred["value"] > 3 * floor
    assert blurred["levels"][32] > blurred["levels"][8]  # blur takes the finest detail


def test_swd_takes_as_many_images_a_side_and_checks_its_input():
    assert sliced_wasserstein(textures(50, 0), textures(20, 1))["n"] == 20
    with pytest.raises(ValueError, match="differ in shape"):
        sliced_wasserstein(textures(4, 0), textures(4, 0)[:, :1])
    with pytest.raises(ValueError, match="multiple of 128"):
        sliced_wasserstein(textures(4, 0), textures(4, 0), directions=100)


# ---- near-copies ---------------------------------------------------------------------------

def test_training_images_are_all_copies_and_held_out_images_few():
    train, held_out = textures(300, 0), textures(100, 1)
    found = copies(train[:50], train, held_out)
    assert found["value"] == 1.0 and found["median"] < 1e-3
    assert (found["nearest"] == torch.arange(50)).all()
    fresh = copies(textures(100, 2), train, held_out)
    assert fresh["value"] <= 0.05 and fresh["real_share"] <= 0.02
    assert abs(fresh["median"] - fresh["real_median"]) < 0.1 * fresh["real_median"]


def test_mirrored_copies_count_only_with_flips():
    train, held_out = textures(100, 0), textures(50, 1)
    mirrored = train[:10].flip(-1)
    assert copies(mirrored, train, held_out)["value"] < 0.5
    found = copies(mirrored, train, held_out, flips=True)
    assert found["value"] == 1.0 and (found["nearest"] == torch.arange(10)).all()
    assert found["mirrored"].all() and not copies(train[:5], train, held_out,
                                                  flips=True)["mirrored"].any()


def test_without_held_out_images_each_training_image_leaves_itself_out():
    train = textures(100, 0)
    train = torch.cat([train, train[:1]])  # one exact duplicate: its nearest other is at 0
    d, _ = nearest(train, train, own=torch.arange(len(train)))
    assert (d[1:100] > 0.1).all() and d[0] < 1e-3 and d[100] < 1e-3  # cdist rounds
    bank = torch.cat([train, train.flip(-1)])  # its mirror is left out too
    d_flip, _ = nearest(train, bank, own=torch.arange(len(train)), period=len(train))
    assert (d_flip[1:100] > 0.1).all()
    held_out = copies(textures(50, 2), train, textures(50, 3))
    left_out = copies(textures(50, 2), train, None)
    assert left_out["real_share"] == pytest.approx(0.01, abs=0.01)
    assert left_out["real_median"] == pytest.approx(held_out["real_median"], rel=0.1)
    assert left_out["value"] <= 0.1


# ---- evaluate on a colour folder, offline --------------------------------------------------

@pytest.fixture
def colour_checkpoint(tmp_path, tiny_cfg):
    """A tiny colour model trained for 2 steps (its samples are noise) on a folder of 60
    textures at 8x8 px: its ckpt.pt, loaded."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i, img in enumerate(textures(60, 3)):
        Image.fromarray(((img.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(
            folder / f"{i:02d}.png")
    cfg = tiny_cfg.override(dataset="folder", root=str(folder), split="train", in_channels=3,
                            cache_dir=str(tmp_path / "cache"), steps=2, sample_n=0,
                            checkpoint_every=0, sample_steps=2)
    train(cfg, progress=False)
    return load_checkpoint(Path(cfg.train.out_dir) / "ckpt.pt")


def test_evaluate_offline_scores_swd_and_copies_without_fid(colour_checkpoint, tmp_path):
    assert default_metrics(colour_checkpoint.config, None) == ("fid", "kid", "swd", "copies",
                                                               "bpd")
    with pytest.warns(UserWarning, match="127.0.0.1:9.*FID and KID are left out"):
        rows = evaluate(colour_checkpoint, 20, bpd_n=2, copies_figure=tmp_path / "copies.png")
    by = {r["metric"]: r for r in rows}
    assert set(by) == {"swd", "copies", "bpd"}
    assert by["swd"]["value"] > 3 * by["swd"]["floor"] > 0  # noise is far from the textures
    assert by["swd"]["n"] == by["swd"]["swd_n"] <= 20 and by["copies"]["n"] == 20
    assert set(by["swd"]["levels"]) == set(by["swd"]["floor_levels"]) == {8}
    assert by["copies"]["value"] == 0 and by["copies"]["threshold"] > 0
    assert Image.open(tmp_path / "copies.png").size[0] > 200
    json.dumps(rows)  # eval.json holds them
    with pytest.raises(FileNotFoundError, match="127.0.0.1:9"):
        evaluate(colour_checkpoint, 20, metrics=("fid",))  # asked for: an error
    with pytest.raises(ValueError, match="drop real"):
        evaluate(colour_checkpoint, 20, metrics=("swd",), real=True)


def test_cli_evaluate_offline_writes_the_table_json_and_copies_picture(colour_checkpoint,
                                                                      tmp_path, capsys):
    ckpt = Path(colour_checkpoint.config.train.out_dir) / "ckpt.pt"
    with warnings.catch_warnings():  # as outside pytest, which otherwise records them
        warnings.simplefilter("default")
        cli_main(["evaluate", "--checkpoint", str(ckpt), "--n", "20", "--bpd_n", "2",
                  "--cache_dir", str(tmp_path / "cache")])
    captured = capsys.readouterr()
    assert "\nwarning: no FID Inception weights" in "\n" + captured.err
    assert "FID and KID are left out" in captured.err
    assert "swd by level: 8 px" in captured.out and "copies" in captured.out
    results = json.loads((ckpt.parent / "eval.json").read_text())["results"]
    assert [r["metric"] for r in results] == ["swd", "copies", "bpd"]
    assert (ckpt.parent / "eval_copies.png").is_file()


def test_training_evaluates_swd_and_copies_offline(tmp_path, tiny_cfg, colour_checkpoint):
    cfg = colour_checkpoint.config.override(out_dir=str(tmp_path / "again"), steps=4,
                                            eval_every=2, eval_n=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = train(cfg, progress=False)
    assert any("FID and KID" in str(w.message) for w in caught)
    assert [e["step"] for e in history["eval"]] == [2, 4]
    assert {"swd", "swd_floor", "copies"} <= set(history["eval"][0])


# ---- fetching the FID Inception weights ----------------------------------------------------

class Files(http.server.BaseHTTPRequestHandler):
    """Serves `body` at any path; with `cut`, promises the whole body but sends only the first
    `cut` bytes, then closes (a dropped connection)."""
    body, cut = b"", None

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body[:self.cut] if self.cut else self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """A file server on a free port of 127.0.0.1: yields its handler class (set body and cut
    on it) and its address."""
    class Handler(Files):
        pass
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield Handler, f"http://127.0.0.1:{httpd.server_address[1]}/weights.pth"
    httpd.shutdown()
    httpd.server_close()


def test_download_checks_the_hash_and_leaves_no_half_file(server, tmp_path):
    import hashlib
    handler, url = server
    handler.body = b"weights" * 1000
    good = hashlib.sha256(handler.body).hexdigest()
    path = tmp_path / "hub" / "w.pth"
    with pytest.raises(OSError, match=f"SHA-256 {good}, not 0+: .*put it at {path}"):
        download(url, path, "0" * 64, progress=False)
    assert not path.parent.exists() or list(path.parent.iterdir()) == []
    handler.cut = 100
    with pytest.raises(OSError, match="stopped after 100 of 7000 bytes; try again"):
        download(url, path, good, progress=False)
    assert list(path.parent.iterdir()) == []
    handler.cut = None
    assert download(url, path, good, progress=False) == path
    assert path.read_bytes() == handler.body and list(path.parent.iterdir()) == [path]


def test_the_inception_weights_are_fetched_into_torch_hub_on_first_use(server, monkeypatch):
    import hashlib
    import io
    handler, url = server
    buffer = io.BytesIO()
    torch.save(features.FIDInception().state_dict(), buffer)
    handler.body = buffer.getvalue()
    monkeypatch.setattr(features, "FID_WEIGHTS_URL", url)
    monkeypatch.setattr(features, "FID_WEIGHTS_SHA256", hashlib.sha256(handler.body).hexdigest())
    ext = features.inception_extractor(progress=False)
    assert ext.name == "inception"
    cached = Path(torch.hub.get_dir()) / "checkpoints" / features.FID_WEIGHTS
    assert cached.read_bytes() == handler.body
    handler.body = b"changed"  # the second use reads the cache, not the server
    assert features.inception_extractor(progress=False).key == ext.key


def test_offline_the_error_names_the_url_and_the_path():
    cached = Path(torch.hub.get_dir()) / "checkpoints" / features.FID_WEIGHTS
    with pytest.raises(FileNotFoundError) as e:
        features.inception_extractor(progress=False)
    assert features.FID_WEIGHTS_URL in str(e.value) and str(cached) in str(e.value)
    assert not cached.exists()


def test_swd_reads_held_out_images_in_a_random_order(tiny_cfg, monkeypatch):
    """The digits' test split comes in class order: 20 samples are compared with 20 held-out
    digits drawn from all of it, not with the first 20 (all zeros)."""
    from smol_diffusion import evaluate as evaluate_module
    seen = []
    real_swd = evaluate_module.sliced_wasserstein
    monkeypatch.setattr(evaluate_module, "sliced_wasserstein",
                        lambda a, b, **k: seen.append(b) or real_swd(a, b, **k))
    cfg = tiny_cfg  # the digits at 8x8, trained on the train split
    test = make_dataset(DataConfig(dataset="mnist", split="test"), 8, 1, progress=False)
    samples = test.images[-20:]  # any 20 images will do
    evaluate_module.pixel_rows(cfg, samples, ("swd",))
    chosen = seen[0]
    zeros = to_model_range(test.images[test.labels == 0])
    from_zeros = sum(bool((zeros == image).all(dim=(1, 2, 3)).any()) for image in chosen)
    assert len(chosen) == 20 and from_zeros < 10


def test_a_folder_whose_test_split_is_empty_is_scored_against_its_training_images(
        tmp_path, tiny_cfg):
    folder = tmp_path / "few"
    folder.mkdir()
    names = [f"{i:03d}.png" for i in range(40)]
    kept = [n for i, n in enumerate(names)
            if i not in folder_split(folder, [folder / m for m in names], "test")][:6]
    for i, name in enumerate(kept):  # six images, none of which the test split would hold
        Image.fromarray(((textures(1, i)[0].permute(1, 2, 0) + 1) * 127.5).byte().numpy()).save(
            folder / name)
    cfg = tiny_cfg.override(dataset="folder", root=str(folder), split="train", in_channels=3,
                            cache_dir=str(tmp_path / "cache"), steps=2, sample_n=0,
                            checkpoint_every=0, sample_steps=2, batch_size=4)
    train(cfg, progress=False)
    ckpt = load_checkpoint(Path(cfg.train.out_dir) / "ckpt.pt")
    rows = evaluate(ckpt, 4, metrics=("swd", "copies", "bpd"), bpd_n=2)
    assert [r["metric"] for r in rows] == ["swd", "copies", "bpd"]
    assert rows[2]["sampler"] == "bound on train split"

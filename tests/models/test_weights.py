"""Pretrained weights: every layout round-trips, downloads, refusals and clear errors (the command that converts
them: tools/test_convert_weights.py)."""
from __future__ import annotations

import collections
import functools
import hashlib
import http.server
import io
import json
import logging
import os
import pickle
import struct
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import rednet
from rednet.models import (
    KEY_LAYOUTS,
    WEIGHTS,
    CheckpointError,
    WeightsFile,
    arch_from_state_dict,
    convert_state_dict,
    detect_key_layout,
    fit_state_dict,
    load_pretrained,
    read_weights,
    save_weights,
    weights_num_classes,
)

from ..helpers import DEPTHS, fails_cleanly, image_tree, to_mmcls, to_paddle, with_nonfinite, write_weights

# --- foreign layouts, built from a model's own weights ---------------------------------


# File names deliberately lie: the layout must come from the content.
FILE_KINDS = [("rednet", "w.bin"), ("mmcls", "w.pdparams"), ("mmcls_legacy", "w.pth"),
              ("paddle2", "w.pth"), ("paddle4", "w.safetensors")]


@pytest.mark.parametrize("kind,fname", FILE_KINDS, ids=[k for k, _ in FILE_KINDS])
def test_roundtrip_identical_outputs(trained, tmp_path, kind, fname):
    sd, x, y = trained
    path = write_weights(kind, sd, tmp_path / fname)
    model = rednet.create_model("rednet26", pretrained=str(path)).eval()
    with torch.no_grad():
        assert torch.equal(model(x), y)
    expect_nbt = 0 if kind.startswith("paddle") else 2  # Paddle has no counter: filled with 0
    assert int(model.state_dict()["stem.0.bn.num_batches_tracked"]) == expect_nbt


@pytest.mark.parametrize("proto", [2, 5])
def test_paddle_pickles_from_numpy_1_and_2(trained, tmp_path, proto):
    """numpy 1.x names its helpers numpy.core.*, numpy 2.x numpy._core.*; files of both exist."""
    sd, _, _ = trained
    data = pickle.dumps(to_paddle(sd), protocol=proto)
    old, new = b"numpy._core.", b"numpy.core."
    assert old in data  # the helpers the unpickler has to allow are really referenced
    for i, blob in enumerate((data, data.replace(old + b"multiarray", new + b"multiarray")
                              .replace(old + b"numeric", new + b"numeric"))):
        if i and proto != 2:
            continue  # protocol >= 4 frames its strings with lengths; renaming would corrupt them
        path = tmp_path / f"w{i}.pdparams"
        path.write_bytes(blob)
        ck = read_weights(path)
        assert (ck.container, ck.layout) == ("pickle", "paddle")
        assert all(torch.equal(ck.state_dict[k], v) for k, v in sd.items() if "num_batches" not in k)


@pytest.mark.parametrize("name", list(DEPTHS))
def test_key_mapping_covers_every_key(name):
    """Paddle and mmcls names of every depth map onto the model exactly (meta device, no forward)."""
    with torch.device("meta"):
        model = rednet.create_model(name)
    target = model.state_dict()
    paddle = {}
    for k, v in target.items():
        if k.endswith("num_batches_tracked"):
            continue
        if k == "fc.weight":
            v = v.t()
        paddle[k.replace("running_mean", "_mean").replace("running_var", "_variance")] = v
    for foreign, layout in ((paddle, "paddle"), ({k: v for k, v in to_mmcls(target)["state_dict"].items()}, "mmcls")):
        ck = convert_state_dict(foreign)
        assert ck.layout == layout
        assert {k: tuple(v.shape) for k, v in ck.state_dict.items()} == {k: tuple(v.shape) for k, v in target.items()}
        fit_state_dict(model, ck)  # raises on any mismatch
        assert ck.arch == name and arch_from_state_dict(ck.state_dict) == name
    assert ck.transposed == [] and len(convert_state_dict(paddle).transposed) == 1


def test_key_layout_is_detected_from_names(trained):
    sd, _, _ = trained
    assert KEY_LAYOUTS == ("rednet", "mmcls", "paddle")
    for layout, foreign in (("rednet", sd), ("mmcls", to_mmcls(sd)["state_dict"]), ("paddle", to_paddle(sd))):
        assert detect_key_layout(foreign) == layout
    assert isinstance(convert_state_dict(sd), WeightsFile)
    with pytest.raises(ValueError, match="unknown layout"):
        convert_state_dict(sd, layout="timm")


def test_default_weights_metadata():
    for name in DEPTHS:
        w = WEIGHTS[f"{name}.paddle_in1k"]
        d = name[len("rednet"):]
        assert w.url == f"https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/RedNet{d}_pretrained.pdparams"
        assert w.layout == "paddle" and 75 < w.top1 < 80
        with torch.device("meta"):
            cfg = rednet.create_model(name).pretrained_cfg
        assert cfg["url"] == w.url and cfg["tag"] == "paddle_in1k"


# --- classifier and stem adaptation ----------------------------------------------------


def test_other_num_classes_drops_classifier_and_says_so(trained, tmp_path, caplog):
    sd, x, _ = trained
    path = write_weights("paddle2", sd, tmp_path / "w.pdparams")
    with caplog.at_level(logging.WARNING):
        model = rednet.create_model("rednet26", pretrained=str(path), num_classes=10).eval()
    assert "1000 classes, the model 10" in caplog.text and "fc" in caplog.text
    assert model.fc.weight.shape == (10, 2048)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items() if not k.startswith("fc.") and "num_batches" not in k)


def test_headless_checkpoint_into_a_classifier(trained, tmp_path, caplog):
    sd, _, _ = trained
    save_weights({k: v for k, v in sd.items() if not k.startswith("fc.")}, tmp_path / "headless.safetensors")
    with caplog.at_level(logging.WARNING):
        model = rednet.create_model("rednet26", pretrained=str(tmp_path / "headless.safetensors"))
    assert "no classifier" in caplog.text
    assert torch.equal(model.state_dict()["layer4.0.bn3.weight"], sd["layer4.0.bn3.weight"])


def test_no_classifier_and_features_only(trained, tmp_path):
    sd, x, _ = trained
    path = write_weights("mmcls", sd, tmp_path / "w.pth")
    ref = rednet.create_model("rednet26", pretrained=str(path)).eval()
    headless = rednet.create_model("rednet26", pretrained=str(path), num_classes=0).eval()
    feats = rednet.create_model("rednet26", pretrained=str(path), features_only=True).eval()
    with torch.no_grad():
        f = ref.forward_features(x)
        assert torch.equal(headless(x), f.mean((2, 3)))
        assert torch.equal(feats(x)[-1], f)


def test_in_chans_adapts_stem(trained, tmp_path):
    sd, _, _ = trained
    path = write_weights("rednet", sd, tmp_path / "w.safetensors")
    model = rednet.create_model("rednet26", pretrained=str(path), in_chans=1)
    w = model.state_dict()["stem.0.conv.weight"]
    assert w.shape == (32, 1, 3, 3)
    torch.testing.assert_close(w, sd["stem.0.conv.weight"].sum(1, keepdim=True))


# --- what does not fit is named ---------------------------------------------------------


def test_wrong_depth_names_both_variants(trained, tmp_path):
    sd, _, _ = trained
    path = write_weights("paddle2", sd, tmp_path / "w.pdparams")
    with pytest.raises(CheckpointError, match=r"missing: layer1\.1\.conv1\.weight") as e:
        rednet.create_model("rednet38", pretrained=str(path))
    assert "rednet26" in str(e.value) and "(2, 3, 5, 2)" in str(e.value)


def test_missing_unexpected_misshaped_are_listed(trained, tmp_path):
    sd, _, _ = trained
    bad = dict(sd)
    del bad["layer3.2.bn1.running_var"]
    bad["layer9.0.extra"] = torch.zeros(1)
    bad["layer2.0.conv1.weight"] = torch.zeros(128, 256, 3, 3)
    save_weights(bad, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as e:
        rednet.create_model("rednet26", pretrained=str(tmp_path / "bad.safetensors"))
    msg = str(e.value)
    assert "1 missing: layer3.2.bn1.running_var" in msg
    assert "1 unexpected: layer9.0.extra" in msg
    assert "layer2.0.conv1.weight (128, 256, 3, 3) in the checkpoint vs (128, 256, 1, 1)" in msg


def test_not_a_rednet_checkpoint(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="none of the RedNet layouts"):
        read_weights(tmp_path / "x.pth")


@pytest.mark.parametrize("kind", ["rednet", "mmcls", "paddle2"])
def test_weights_num_classes_reads_the_classifier_of_every_layout(tmp_path, kind):
    """7 classes in every layout: mmcls's head.fc.weight, PaddleClas's transposed (2048, 7) fc.weight."""
    sd = rednet.create_model("rednet26", num_classes=7).state_dict()
    assert weights_num_classes(write_weights(kind, sd, tmp_path / "w.bin")) == 7
    headless = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    assert weights_num_classes(write_weights(kind, headless, tmp_path / "headless.bin")) is None


def test_weights_num_classes_of_another_models_file(tmp_path):
    """A timm model's own file (in no RedNet layout) is read under its own names, its classifier named."""
    path = tmp_path / "vit.pth"
    torch.save(rednet.create_model("test_vit", num_classes=5).state_dict(), path)
    assert weights_num_classes(path, classifier="head") == 5 and weights_num_classes(path) is None


# --- corrupt, truncated, malicious ------------------------------------------------------


@pytest.mark.parametrize("kind", ["rednet", "mmcls", "paddle2", "paddle4"])
def test_truncated_file_is_a_clear_error(trained, tmp_path, kind):
    sd, _, _ = trained
    path = write_weights(kind, sd, tmp_path / "w.bin")
    data = path.read_bytes()
    for cut in (len(data) // 2, 40):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as e:
            read_weights(path)
        msg = str(e.value)
        assert str(path) in msg and ("truncated" in msg or "corrupt" in msg) and "delete" in msg


def test_garbage_and_empty_files(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(64).replace(b"\x80", b"\x00").replace(b"PK", b"pk").replace(b"{", b"("))
    with pytest.raises(CheckpointError, match="unrecognised format"):
        read_weights(junk)
    empty = tmp_path / "empty.pdparams"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="0 bytes"):
        read_weights(empty)
    with pytest.raises(FileNotFoundError, match="not found"):
        rednet.create_model("rednet26", pretrained=str(tmp_path / "absent.pth"))


class _Pwn:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("proto", [2, 4])
def test_pickle_that_runs_code_is_refused(tmp_path, proto):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pdparams"
    with open(path, "wb") as f:
        pickle.dump({"stem.0.conv.weight": np.zeros((32, 3, 3, 3), np.float32), "x": _Pwn(marker)}, f, protocol=proto)
    with pytest.raises(CheckpointError, match=r"refusing to load .*evil\.pdparams.*references (posix|os|nt)\.system"):
        read_weights(path)
    assert not marker.exists()


def test_pickle_builtins_eval_is_refused(tmp_path):
    # A hand-written protocol-2 pickle calling builtins.eval: GLOBAL, args tuple, REDUCE.
    path = tmp_path / "eval.pdparams"
    path.write_bytes(b"\x80\x02cbuiltins\neval\nX\x0a\x00\x00\x00print(123)\x85R.")
    with pytest.raises(CheckpointError, match="references builtins.eval"):
        read_weights(path)


class _RunInfo:
    """Stands for whatever a training framework leaves in ``meta``: a class torch does not allowlist."""

    def __init__(self):
        self.epoch = 130


def test_mmcls_meta_with_foreign_objects_still_loads_the_weights(trained, tmp_path):
    sd, x, y = trained
    path = tmp_path / "release.pth"
    torch.save(to_mmcls(sd, meta={"run": _RunInfo(), "best": np.float64(0.76)}), path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # what a plain torch.load makes of it
    ck = read_weights(path)
    assert ck.layout == "mmcls" and ck.dropped == ["meta"]
    model = rednet.create_model("rednet26").eval()
    model.load_state_dict(fit_state_dict(model, ck))
    with torch.no_grad():
        assert torch.equal(model(x), y)


def test_torch_file_that_runs_code_is_refused(trained, tmp_path):
    sd, _, _ = trained
    marker = tmp_path / "pwned"
    path = tmp_path / "release.pth"
    torch.save(to_mmcls({"fc.bias": sd["fc.bias"]}, meta={"hook": _Pwn(marker)}), path)
    with pytest.raises(CheckpointError, match=r"refusing to load .*release\.pth.*(posix|os|nt)\.system"):
        read_weights(path)
    assert not marker.exists()


def test_weights_pickle_naming_a_module_outside_the_allow_list(tmp_path, capsys):
    data = image_tree(tmp_path / "data")
    evil = tmp_path / "evil.pdparams"
    evil.write_bytes(b"\x80\x02cnumpy.dtypes_evil\nEvilDType\n.")  # protocol 2, then one GLOBAL opcode
    # A RedNet: its weights go through rednet.models' readers (timm models through timm's torch.load).
    fails_cleanly(capsys, "eval", ["--model", "rednet26", "--pretrained", str(evil), "--data", str(data)],
                   r"refusing to load .*evil\.pdparams.*numpy\.dtypes_evil")


# --- sizes a file declares are checked before anything is allocated --------------------


def test_pdparams_declaring_a_huge_array_is_refused_before_allocating(tmp_path):
    # 90 bytes: {"stem.0.conv.weight": _reconstruct(ndarray, (2**29,), "b")}, i.e. 512 MiB of int8.
    path = tmp_path / "bomb.pdparams"
    path.write_bytes(b"\x80\x02}X\x12\x00\x00\x00stem.0.conv.weightcnumpy.core.multiarray\n_reconstruct\n"
                     b"cnumpy\nndarray\nJ\x00\x00\x00\x20\x85C\x01b\x87Rs.")
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=r"refusing to load .*bomb\.pdparams.*declares 536,870,912 bytes"):
            read_weights(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB allocated for a {path.stat().st_size}-byte file"


class _SharedBytes:
    """Pickles as a float32 array of ``data``; the pickler writes one ``data`` and refers to it after."""

    def __init__(self, data: bytes):
        self.data = data

    def __reduce__(self):
        reconstruct = np.ndarray.__reduce__(np.zeros(0, np.float32))[0]
        state = (1, (len(self.data) // 4,), np.dtype(np.float32), False, self.data)
        return reconstruct, (np.ndarray, (0,), b"b"), state


def test_pdparams_reusing_one_buffer_for_many_arrays_is_refused(tmp_path):
    # 64 KiB on disk, referenced by 256 arrays: 16 MiB declared (the same trick reaches any size).
    data = np.random.default_rng(0).random(16384, dtype=np.float32).tobytes()
    path = tmp_path / "shared.pdparams"
    with open(path, "wb") as f:
        pickle.dump({f"layer1.{i}.conv1.weight": _SharedBytes(data) for i in range(256)}, f, protocol=4)
    assert path.stat().st_size < 100_000
    with pytest.raises(CheckpointError, match="more than the [0-9,]+ bytes the file holds"):
        read_weights(path)


def test_pdparams_object_array_is_refused(tmp_path):
    path = tmp_path / "objects.pdparams"
    with open(path, "wb") as f:
        pickle.dump({"stem.0.conv.weight": np.array([1, "x"], dtype=object)}, f, protocol=2)
    with pytest.raises(CheckpointError, match="refusing to load .*dtype object holds Python objects"):
        read_weights(path)


class _Storage:
    pass


class _LazyTensor:
    """Pickles like a torch tensor of ``numel`` bytes in storage "0", without the bytes."""

    def __init__(self, numel: int):
        self.numel = numel

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (_Storage(), 0, (self.numel,), (1,), False, collections.OrderedDict())


def _torch_zip(numel: int, data: tuple[int, bytes, int]) -> bytes:
    """A torch.save-style zip by hand: data.pkl declaring a uint8 tensor, and its record
    ``data = (zip method, payload, uncompressed size)`` as given (zipfile cannot write a bomb)."""

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.ByteStorage, "0", "cpu", numel) if isinstance(obj, _Storage) else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"stem.0.conv.weight": _LazyTensor(numel)})
    entries = [("archive/data.pkl", 0, buf.getvalue(), len(buf.getvalue())), ("archive/data/0", *data),
               ("archive/version", 0, b"3\n", 2), ("archive/byteorder", 0, b"little", 6)]
    out, central = bytearray(), bytearray()
    for name, method, payload, size in entries:
        n, crc = name.encode(), zlib.crc32(payload) if method == 0 else 0
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0, crc, len(payload), size,
                               len(n), 0, 0, 0, 0, 0, len(out)) + n
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0, crc, len(payload), size, len(n), 0)
        out += n + payload
    eocd = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central), len(out), 0)
    return bytes(out + central + eocd)


def test_torch_zip_bomb_is_refused_before_unpacking(tmp_path):
    small = tmp_path / "small.pth"
    small.write_bytes(_torch_zip(4, (0, b"\x01\x02\x03\x04", 4)))
    assert read_weights(small).state_dict["stem.0.conv.weight"].tolist() == [1, 2, 3, 4]  # the zip is sound
    # 1 GiB of zeros deflated to about 1 MB: full flushes make each MiB's block identical,
    # so the bomb is built from one compressed MiB.
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = z.compress(bytes(1 << 20)) + z.flush(zlib.Z_FULL_FLUSH)
    bomb = tmp_path / "bomb.pth"
    bomb.write_bytes(_torch_zip(1 << 30, (8, block * 1024 + z.flush(), 1 << 30)))
    assert bomb.stat().st_size < 2 << 20
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=r"refusing to load .*bomb\.pth.*unpack to [0-9,]+ bytes from a") as e:
        read_weights(bomb)
    assert "decompression bomb" in str(e.value) and time.monotonic() - start < 1


def test_safetensors_offsets_beyond_the_file_are_refused(tmp_path):
    # safetensors checks its header against the file itself; this guards that it still does.
    header = json.dumps({"stem.0.conv.weight": {"dtype": "F32", "shape": [1 << 28], "data_offsets": [0, 1 << 30]}})
    path = tmp_path / "lying.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header.encode() + bytes(16))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="lying.safetensors: cannot read this safetensors file"):
            read_weights(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


# --- NaN and infinity are never silent ---------------------------------------------------


def test_nonfinite_weights_load_with_one_warning(trained, tmp_path, caplog):
    sd, _, _ = trained
    save_weights(with_nonfinite(sd), tmp_path / "nan.safetensors")
    with caplog.at_level(logging.WARNING, logger="rednet"):
        model = rednet.create_model("rednet26", pretrained=str(tmp_path / "nan.safetensors"))
    assert torch.isnan(model.layer1[0].conv1.weight).sum() == 2  # loaded as they are: the user was told
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "nan.safetensors: 3 NaN or infinite values in 2 tensors: " in msg
    assert "layer1.0.conv1.weight (2)" in msg and "fc.bias (1)" in msg
    assert read_weights(tmp_path / "nan.safetensors").summary()["nonfinite"] == 3


# --- downloads through torch.hub's cache ------------------------------------------------


@pytest.fixture()
def server(tmp_path, monkeypatch):
    """A static file server on 127.0.0.1 and a TORCH_HOME of our own."""
    root = tmp_path / "www"
    root.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download_default_weights_into_hub_cache(trained, tmp_path, server):
    sd, x, y = trained
    root, base = server
    src = write_weights("paddle2", sd, root / "RedNet26_pretrained.pdparams")
    url = f"{base}/RedNet26_pretrained.pdparams"
    # pretrained=True follows the pretrained_cfg URL; point it at the local server.
    model = rednet.create_model("rednet26", pretrained=True, pretrained_cfg_overlay=dict(url=url)).eval()
    # Cached under <12 hex of sha256(url)>-<file name>: the URL picks the entry, the name stays readable.
    key = hashlib.sha256(url.encode()).hexdigest()[:12]
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / f"{key}-RedNet26_pretrained.pdparams"
    assert cached.read_bytes() == src.read_bytes()
    with torch.no_grad():
        assert torch.equal(model(x), y)
    src.unlink()  # second load comes from the cache
    rednet.create_model("rednet26", pretrained=url)


def test_download_sha256_verified(trained, tmp_path, server):
    sd, x, y = trained
    root, base = server
    src = write_weights("mmcls", sd, root / "release.pth")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    model = rednet.create_model("rednet26")
    wrong = "0" * 64
    with pytest.raises(CheckpointError, match=f"sha256 mismatch.*{wrong}.*{digest[:16]}"):
        load_pretrained(model, f"{base}/release.pth", sha256=wrong, progress=False)
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    assert not (cache / "release.pth").exists() and not list(cache.glob("*.partial"))
    load_pretrained(model, f"{base}/release.pth", sha256=digest, progress=False)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), y)
    with pytest.raises(CheckpointError, match="could not download .*absent.pth"):
        load_pretrained(model, f"{base}/absent.pth", progress=False)


def test_file_url(trained, tmp_path, monkeypatch):
    sd, x, y = trained
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    src = write_weights("rednet", sd, tmp_path / "mine.safetensors")
    model = rednet.create_model("rednet26", pretrained=src.as_uri()).eval()
    with torch.no_grad():
        assert torch.equal(model(x), y)
    key = hashlib.sha256(src.as_uri().encode()).hexdigest()[:12]
    assert (tmp_path / "th" / "hub" / "checkpoints" / f"{key}-mine.safetensors").is_file()

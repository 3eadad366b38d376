"""Tests of airvae.data against the real dataset files in shared/data (no network)."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from airvae import data as D
from airvae.data import Dataset, DatasetError, load_dataset, npz, sources

DATA = Path(os.environ.get("AIRVAE_TEST_DATA_DIR",
                           Path(__file__).resolve().parents[2] / "shared" / "data"))
ORIG = DATA / "originals"
needs_data = pytest.mark.skipif(
    not DATA.is_dir(),
    reason=f"dataset files not found at {DATA}; set AIRVAE_TEST_DATA_DIR to the shared/data folder",
)

MNIST_MAT = [f"binarized_mnist_{s}.mat" for s in ("train", "valid", "test")]
CALTECH_MAT = "caltech101_silhouettes_28_split1.mat"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test may use the network or the user's own data/cache settings."""
    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.delenv(D.DATA_DIR_ENV, raising=False)
    monkeypatch.delenv(D.CACHE_DIR_ENV, raising=False)


def _copy(tmp_path: Path, *files: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    for f in files:
        shutil.copy(f, d / f.name)
    return d


def _load(name, data_dir, cache_dir, **kw) -> Dataset:
    return load_dataset(name, data_dir=data_dir, cache_dir=cache_dir, download=False, **kw)


def _same(a: Dataset, b: Dataset) -> None:
    for s in ("train", "valid", "test"):
        np.testing.assert_array_equal(a.split(s), b.split(s))


def _to_amat(x: np.ndarray) -> bytes:
    """Larochelle's text format: 784 digits separated by single spaces, one row a line."""
    chars = np.full((x.shape[0], 2 * x.shape[1]), ord(" "), dtype=np.uint8)
    chars[:, 0::2] = x + ord("0")
    chars[:, -1] = ord("\n")
    return chars.tobytes()


# ----------------------------------------------------------------- the real datasets

@needs_data
@pytest.mark.parametrize("name, sizes, means, deviated", [
    ("mnist", (50000, 10000, 10000), (0.130562, 0.131127, 0.132512), False),
    # Caltech means after the flip to 1 = object (MANIFEST section 2).
    ("caltech", (4100, 2264, 2307), (0.448945, 0.464041, 0.460985), False),
    ("omniglot", (23000, 1345, 8115), (0.080773, 0.080432, 0.079745), True),
])
def test_named_datasets(tmp_path, name, sizes, means, deviated):
    ds = _load(name, DATA, tmp_path / "cache")
    assert ds.name == name and ds.dim == 784
    for s, n, m in zip(("train", "valid", "test"), sizes, means, strict=True):
        x = ds.split(s)
        assert x.shape == (n, 784) and x.dtype == np.uint8
        assert x.max() == 1 and x.min() == 0
        assert x.mean() == pytest.approx(m, abs=1e-6)
    assert str(DATA) in ds.source
    if deviated:
        assert "8115" in ds.deviation and "not comparable" in ds.deviation
        assert (tmp_path / "cache" / "omniglot_lake_DEVIATION.npz").is_file()
        assert not (tmp_path / "cache" / "omniglot_chardata.npz").exists()
    else:
        assert ds.deviation is None


@needs_data
def test_caltech_convention(tmp_path):
    ds = _load("caltech", DATA, tmp_path)
    with np.load(DATA / "caltech101_silhouettes_28.npz") as d:
        stored = np.unpackbits(d["train"], axis=-1, count=784)
    # stored: 1 = background, column-major; returned: 1 = object, row-major
    expect = 1 - stored.reshape(-1, 28, 28).transpose(0, 2, 1)
    np.testing.assert_array_equal(ds.train.reshape(-1, 28, 28), expect)
    assert "1 = object" in ds.source


@needs_data
@pytest.mark.parametrize("name, originals", [("mnist", MNIST_MAT), ("caltech", [CALTECH_MAT])])
def test_originals_match_converted(tmp_path, name, originals):
    from_npz = _load(name, DATA, tmp_path / "c1")
    from_mat = _load(name, _copy(tmp_path, *(ORIG / f for f in originals)), tmp_path / "c2")
    _same(from_npz, from_mat)
    assert originals[0] in from_mat.source


@needs_data
def test_originals_subfolder_is_searched(tmp_path):
    d = tmp_path / "data" / "originals"
    d.mkdir(parents=True)
    shutil.copy(ORIG / CALTECH_MAT, d)
    ds = _load("caltech", tmp_path / "data", tmp_path / "cache")
    assert str(d / CALTECH_MAT) in ds.source


@needs_data
def test_mnist_amat_text_files(tmp_path):
    """The recorded sha256 of the Toronto .amat files match our data re-serialised."""
    ref = _load("mnist", DATA, tmp_path / "c1")
    d = tmp_path / "amat"
    d.mkdir()
    for s in ("train", "valid", "test"):
        (d / f"binarized_mnist_{s}.amat").write_bytes(_to_amat(ref.split(s)))
    _same(ref, _load("mnist", d, tmp_path / "c2"))


@needs_data
def test_second_load_comes_from_cache(tmp_path, monkeypatch):
    data_dir = _copy(tmp_path, DATA / "caltech101_silhouettes_28.npz")
    first = _load("caltech", data_dir, tmp_path / "cache")
    shutil.rmtree(data_dir)
    monkeypatch.setenv(D.CACHE_DIR_ENV, str(tmp_path / "cache"))
    second = load_dataset("caltech", download=False)
    _same(first, second)
    cache = tmp_path / "cache" / "caltech.npz"
    assert second.source.startswith(str(cache))
    with np.load(cache) as d:  # the documented cache format
        assert int(d["dim"]) == 784
        np.testing.assert_array_equal(d["train"], np.packbits(first.train, axis=-1))


@needs_data
def test_data_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv(D.DATA_DIR_ENV, str(DATA))
    assert load_dataset("caltech", cache_dir=tmp_path, download=False).train.shape[0] == 4100


@needs_data
def test_unwritable_cache_still_returns_data(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.warns(UserWarning, match="could not write the dataset cache"):
        ds = _load("caltech", DATA, not_a_dir)
    assert ds.train.shape == (4100, 784)


@needs_data
def test_cache_is_never_written_through_a_symbolic_link(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "cache").symlink_to(elsewhere)
    with pytest.warns(UserWarning, match="could not write the dataset cache.*symbolic link"):
        ds = _load("caltech", DATA, tmp_path / "cache")
    assert ds.train.shape == (4100, 784)  # the data is still returned
    assert not any(elsewhere.iterdir())


# ----------------------------------------------------------------- error paths

@needs_data
def test_corrupted_copy_is_rejected(tmp_path):
    d = _copy(tmp_path, DATA / "caltech101_silhouettes_28.npz")
    f = d / "caltech101_silhouettes_28.npz"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match="checksum") as e:
        _load("caltech", d, tmp_path / "cache")
    assert "caltech101_silhouettes_28.npz" in str(e.value) and "21c5b447" in str(e.value)
    assert not (tmp_path / "cache" / "caltech.npz").exists()


def test_corrupt_cache_is_reported(tmp_path):
    (tmp_path / "caltech.npz").write_bytes(b"not a zip file")
    with pytest.raises(DatasetError, match="(?s)caltech.npz.*corrupt.*Delete"):
        _load("caltech", None, tmp_path)


def test_missing_files_list_accepted_names(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError) as e:
        _load("mnist", tmp_path / "empty", tmp_path / "cache")
    msg = str(e.value)
    for name in ("binarized_mnist.npz", "binarized_mnist_train.mat", "binarized_mnist_test.amat",
                 "--data-dir", D.DATA_DIR_ENV, "download=False"):
        assert name in msg


def test_missing_omniglot_names_both_options(tmp_path):
    with pytest.raises(DatasetError) as e:
        _load("omniglot", None, tmp_path)
    assert "chardata.mat" in str(e.value)
    assert "omniglot_28x28_from_lake_DEVIATION.npz" in str(e.value)


@needs_data
def test_partial_file_set_is_reported(tmp_path):
    d = _copy(tmp_path, ORIG / MNIST_MAT[0])
    with pytest.raises(DatasetError, match="missing: binarized_mnist_valid.mat"):
        _load("mnist", d, tmp_path / "cache")


def test_bad_data_dir_and_names(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        _load("mnist", tmp_path / "nope", tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("cifar10", download=False)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "missing.npz")


# ----------------------------------------------------------------- user datasets

def test_user_npz_loads(tmp_path):
    rng = np.random.default_rng(0)
    f = tmp_path / "toy.npz"
    np.savez(f, train=rng.random((20, 12)) < 0.5,             # bool
             valid=(rng.random((5, 12)) < 0.5).astype(np.float32),
             test=(rng.random((6, 12)) < 0.5).astype(np.int64))
    ds = load_dataset(str(f), cache_dir=tmp_path / "cache")
    assert (ds.name, ds.dim, ds.test.shape, ds.valid.dtype) == ("toy", 12, (6, 12), np.uint8)
    assert str(f) in ds.source and ds.deviation is None
    assert not (tmp_path / "cache").exists()  # user files are not cached
    with pytest.raises(DatasetError, match="unknown split"):
        ds.split("validation")


def test_user_npz_of_8bit_images_and_real_values(tmp_path):
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 256, (n, 3, 4, 5), dtype=np.uint8) for s, n in (("train", 6), ("valid", 2),
                                                                               ("test", 3))}
    np.savez(tmp_path / "rgb.npz", **images)
    ds = load_dataset(tmp_path / "rgb.npz")
    assert (ds.levels, ds.image_shape, ds.dim, ds.kind, ds.train.dtype) == (256, (3, 4, 5), 60, "256 levels",
                                                                            np.float32)
    # rows are the images flattened row-major, as models see them: x / 255 exactly
    np.testing.assert_array_equal(ds.test[1].reshape(3, 4, 5) * 255, images["test"][1])
    assert ds.test[2, 4 * 5 + 5 + 2] * 255 == images["test"][2, 1, 1, 2]

    real = {s: rng.normal(size=(n, 7)) for s, n in (("train", 6), ("valid", 2), ("test", 3))}
    np.savez(tmp_path / "real.npz", **real)
    ds = load_dataset(tmp_path / "real.npz")
    assert (ds.levels, ds.image_shape, ds.kind) == (None, None, "real-valued")
    np.testing.assert_array_equal(ds.valid, real["valid"].astype(np.float32))

    grey = {s: rng.integers(0, 17, (n, 1, 8, 8)) for s, n in (("train", 6), ("valid", 2), ("test", 3))}
    np.savez(tmp_path / "grey.npz", levels=17, **grey)
    ds = load_dataset(tmp_path / "grey.npz")
    assert (ds.levels, ds.image_shape) == (17, (1, 8, 8))
    np.testing.assert_array_equal(ds.train * 16, grey["train"].reshape(6, 64))


@pytest.mark.parametrize("arrays, match", [
    (dict(train=np.zeros((4, 3)), valid=np.zeros((2, 3)), test=np.full((2, 3), np.nan)),
     "'test' contains NaN or infinite values"),
    (dict(train=np.zeros((4, 3), np.int16), valid=np.zeros((2, 3), np.int16), test=np.full((2, 3), 300, np.int16)),
     "integer values from 0 to 300"),
    (dict(train=np.zeros((4, 3), np.int8), valid=np.full((2, 3), -1, np.int8), test=np.zeros((2, 3), np.int8)),
     "integer values from -1 to 0"),
    (dict(train=np.full((4, 3), 5), valid=np.zeros((2, 3)), test=np.zeros((2, 3)), levels=4),
     "outside the integers 0..3"),
    (dict(train=np.full((4, 3), 0.5), valid=np.zeros((2, 3)), test=np.zeros((2, 3)), levels=2),
     "outside the integers 0..1"),
    (dict(train=np.zeros((4, 3)), valid=np.zeros((2, 3)), test=np.zeros((2, 3)), levels=1000),
     "'levels' must be one integer from 2 to 256"),
    (dict(train=np.zeros((4, 3)), validation=np.zeros((2, 3)), test=np.zeros((2, 3))),
     "lacks valid"),
    (dict(train=np.zeros((4, 3)), valid=np.zeros((2, 5)), test=np.zeros((2, 3))),
     "'valid' has shape"),
    (dict(train=np.zeros((4, 1, 2, 2)), valid=np.zeros((2, 1, 2, 3)), test=np.zeros((2, 1, 2, 2))),
     "'valid' has shape"),
    (dict(train=np.zeros(4), valid=np.zeros(2), test=np.zeros(2)), "'train' has shape"),
    (dict(train=np.zeros((4, 8, 8)), valid=np.zeros((2, 8, 8)), test=np.zeros((2, 8, 8))), r"x\[:, None\]"),
])
def test_user_npz_errors(tmp_path, arrays, match):
    f = tmp_path / "bad.npz"
    np.savez(f, **arrays)
    with pytest.raises(DatasetError, match=match):
        load_dataset(f)


# ----------------------------------------------------------------- hostile user files

def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def _npy_header(shape: tuple[int, ...], descr: str = "|u1") -> bytes:
    """Just the header of a .npy file declaring an array of ``shape`` (no data need follow)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _npz_with_train(path: Path, train: bytes) -> Path:
    """An .npz whose train.npy member is the given bytes; valid and test are fine."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("train.npy", train)
        for s in ("valid", "test"):
            z.writestr(f"{s}.npy", _npy(np.zeros((2, 3), np.uint8)))
    return path


def _refused(path, match: str) -> str:
    with pytest.raises(DatasetError, match=match) as e:
        load_dataset(path)
    message = str(e.value)
    assert str(path) in message and "\n" not in message
    return message


@pytest.fixture
def no_array_reads(monkeypatch):
    """Fail the test if any .npy member's data is read: refusals must come from headers alone."""
    def read_array(*args, **kwargs):
        raise AssertionError("an array was read before its size was checked")

    monkeypatch.setattr(np.lib.format, "read_array", read_array)


@pytest.mark.parametrize("member", [
    np.random.default_rng(0).bytes(1000),  # not a .npy at all
    b"\x93NUMPY\x01\x00\x0a\x00not a dict",  # the magic, then a header that is no header
])
def test_user_npz_member_that_is_not_an_array(tmp_path, member):
    _refused(_npz_with_train(tmp_path / "bad.npz", member), r"member 'train\.npy' .*not a numpy array")


def test_user_npz_declaring_a_huge_array_is_refused_from_its_header(tmp_path, no_array_reads):
    # 10^12 elements at the real limits: refused before any memory is allocated for it.
    f = _npz_with_train(tmp_path / "huge.npz", _npy_header((10**6, 10**6)) + bytes(64))
    message = _refused(f, r"member 'train\.npy' declares a \(1000000, 1000000\) uint8 array")
    assert "fewer examples" in message


def test_user_npz_member_shorter_than_its_header_says(tmp_path, no_array_reads):
    f = _npz_with_train(tmp_path / "short.npz", _npy_header((1000, 1000)) + bytes(10))
    _refused(f, r"member 'train\.npy' declares .* but holds only")


def test_user_npz_zip_bomb_is_refused_before_decompressing(tmp_path, monkeypatch, no_array_reads):
    # A 1 MB block of zeros deflates ~1000:1, as a multi-GiB bomb would; the limits are lowered so
    # that a small file shows it.
    f = tmp_path / "bomb.npz"
    np.savez_compressed(f, train=np.zeros((1000, 1000), np.uint8), valid=np.zeros((2, 1000)),
                        test=np.zeros((2, 1000)))
    monkeypatch.setattr(npz, "MAX_COMPRESSION_RATIO", 100)
    monkeypatch.setattr(npz, "RATIO_CHECKED_ABOVE", 1000)
    message = _refused(f, r"member 'train\.npy' decompresses to .* \(\d+:1, above the 100:1")
    assert "np.savez" in message


@pytest.mark.parametrize("kind", ["FIFO", "link to /dev/zero", "folder"])
def test_user_dataset_must_be_a_regular_file(tmp_path, kind):
    f = tmp_path / "x.npz"
    if kind == "FIFO":
        os.mkfifo(f)
    elif kind == "folder":
        f.mkdir()
    else:
        f.symlink_to("/dev/zero")
    _refused(f, "not a regular file")
    with pytest.raises(DatasetError, match="not a regular file"):
        D.check_dataset_name(str(f))


def test_check_dataset_name_without_loading(tmp_path):
    real = tmp_path / "real.npz"
    np.savez(real, train=np.zeros((2, 3)), valid=np.zeros((1, 3)), test=np.zeros((1, 3)))
    (tmp_path / "link.npz").symlink_to(real)  # a link to a regular file is fine
    for name in ("mnist", "Digits", str(real), str(tmp_path / "link.npz")):
        D.check_dataset_name(name)
    assert load_dataset(tmp_path / "link.npz").dim == 3
    with pytest.raises(DatasetError, match="does not exist"):
        D.check_dataset_name(str(tmp_path / "missing.npz"))
    with pytest.raises(DatasetError, match="unknown dataset"):
        D.check_dataset_name("cifar10")


# ----------------------------------------------------------------- chardata.mat path

def _git_blob(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_git_blob_digest(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    assert sources._digest(tmp_path / "empty", "gitblob") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"


def _reference_chardata_split(data, testdata, n_valid):
    """The MANIFEST section 3 recipe written out with the global numpy RNG (as rebar)."""
    def rows(x):
        return x.T.astype(np.float32).reshape(-1, 28, 28).reshape(-1, 784, order="F")

    state = np.random.get_state()
    try:
        np.random.seed(5)
        pool = np.random.rand(*rows(data).shape) < rows(data)
        test = np.random.rand(*rows(testdata).shape) < rows(testdata)
    finally:
        np.random.set_state(state)
    pool = pool[np.random.RandomState(123).permutation(len(pool))]
    return pool[:-n_valid], pool[-n_valid:], test


def test_chardata_conversion(tmp_path, monkeypatch):
    """A small chardata-like .mat with the real file's layout goes through the real code;
    only the expected blob id and split sizes are swapped for the synthetic file's."""
    rng = np.random.default_rng(1)
    data, testdata = rng.random((784, 30)), rng.random((784, 7))  # (pixels, images) as Burda's
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"data": data, "testdata": testdata})
    d = tmp_path / "data"
    d.mkdir()
    (d / "chardata.mat").write_bytes(buf.getvalue())

    spec = sources.SPECS["omniglot"]
    real = spec.variants[0]
    assert real.files == {"chardata.mat": "gitblob:016a3536ffe5e1d38e42563a18d7a78bfaf643ec"}
    with pytest.raises(DatasetError, match="git blob id 016a3536"):  # real checksum rejects it
        _load("omniglot", d, tmp_path / "c0")

    fake = dataclasses.replace(real, files={"chardata.mat": "gitblob:" + _git_blob(buf.getvalue())},
                               sizes=(25, 5, 7))
    monkeypatch.setitem(sources.SPECS, "omniglot", dataclasses.replace(
        spec, variants=(fake,) + spec.variants[1:]))
    if DATA.is_dir():  # chardata must win over the DEVIATION file when both are present
        shutil.copy(DATA / "omniglot_28x28_from_lake_DEVIATION.npz", d)
    before = np.random.get_state()[1].copy()
    ds = _load("omniglot", d, tmp_path / "cache")
    np.testing.assert_array_equal(np.random.get_state()[1], before)  # global RNG untouched
    assert ds.deviation is None and "chardata.mat" in ds.source
    for got, want in zip((ds.train, ds.valid, ds.test), _reference_chardata_split(data, testdata, 5), strict=True):
        np.testing.assert_array_equal(got, want)
    assert (tmp_path / "cache" / "omniglot_chardata.npz").is_file()
    assert not (tmp_path / "cache" / "omniglot_lake_DEVIATION.npz").exists()
    _same(ds, _load("omniglot", None, tmp_path / "cache"))  # and back from its own cache


# ----------------------------------------------------------------- download (faked)

class _FakeResponse(io.BytesIO):
    def __init__(self, payload: bytes):
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}


@needs_data
def test_download_path_with_fake_server(tmp_path, monkeypatch):
    payload = (ORIG / CALTECH_MAT).read_bytes()
    urls = []

    def fake_urlopen(url, timeout=None):
        urls.append(url)
        return _FakeResponse(payload)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    ds = load_dataset("caltech", cache_dir=tmp_path, progress=False)
    assert urls == ["https://people.cs.umass.edu/~marlin/data/" + CALTECH_MAT]
    assert (tmp_path / "raw" / CALTECH_MAT).is_file() and (tmp_path / "caltech.npz").is_file()
    _same(ds, _load("caltech", DATA, tmp_path / "ref"))


def test_download_failures_explain_offline_use(tmp_path, monkeypatch):
    def unreachable(url, timeout=None):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    with pytest.raises(DatasetError) as e:
        load_dataset("omniglot", cache_dir=tmp_path, progress=False)
    msg = str(e.value)
    assert "download of https://github.com/yburda/iwae" in msg and "no route to host" in msg
    assert "Offline" in msg and D.DATA_DIR_ENV in msg and "--data-dir" in msg
    assert "omniglot_28x28_from_lake_DEVIATION.npz" in msg


def test_download_with_wrong_checksum_is_deleted(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: _FakeResponse(b"<html>"))
    with pytest.raises(DatasetError, match="checksum mismatch"):
        load_dataset("caltech", cache_dir=tmp_path, progress=False)
    assert not any((tmp_path / "raw").iterdir())


def test_a_download_longer_than_any_source_file_is_cut_and_deleted(tmp_path, monkeypatch):
    """A server (or a man in the middle of plain http) streaming without end never fills the disk:
    the download stops at MAX_DOWNLOAD_BYTES, whatever Content-Length claims, and leaves nothing."""
    import airvae.data.cache as cache

    monkeypatch.setattr(cache, "MAX_DOWNLOAD_BYTES", 100_000)
    served = []

    class Endless(_FakeResponse):
        def read(self, size=-1):
            served.append(size)
            return b"x" * size

    for claimed in (None, "10", "200000"):
        response = Endless(b"")
        response.headers = {} if claimed is None else {"Content-Length": claimed}
        monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None, r=response: r)
        served.clear()
        with pytest.raises(DatasetError, match="longer than 100,000 bytes"):
            load_dataset("caltech", cache_dir=tmp_path, progress=False)
        assert not any((tmp_path / "raw").iterdir())
        assert sum(served) <= 100_000 + (1 << 16)  # stopped within one chunk of the limit


def test_download_never_writes_through_a_planted_link(tmp_path, monkeypatch):
    # A link at the name the download used to stream into must not redirect the download's bytes.
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "cache" / "raw").mkdir(parents=True)
    (tmp_path / "cache" / "raw" / (CALTECH_MAT + ".part")).symlink_to(victim)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: _FakeResponse(b"<html>"))
    with pytest.raises(DatasetError, match="checksum mismatch"):
        load_dataset("caltech", cache_dir=tmp_path / "cache", progress=False)
    assert victim.read_text() == "precious"


@needs_data
def test_download_folder_that_is_a_symbolic_link_is_not_used(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "raw").symlink_to(elsewhere)
    payload = (ORIG / CALTECH_MAT).read_bytes()
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: _FakeResponse(payload))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the fallback download folder
    with pytest.warns(UserWarning, match="symbolic link"):
        ds = load_dataset("caltech", cache_dir=tmp_path / "cache", progress=False)
    assert ds.train.shape == (4100, 784) and not any(elsewhere.iterdir())


def test_evenly_spaced_subsets_cover_the_whole_split():
    idx = D.evenly_spaced(10000, 500)
    assert len(idx) == 500 and idx[0] == 0 and idx[-1] == 9999 and (np.diff(idx) > 0).all()
    assert np.array_equal(D.evenly_spaced(7, None), np.arange(7)) and np.array_equal(D.evenly_spaced(7, 99), np.arange(7))
    assert np.array_equal(D.evenly_spaced(10, 1), [0])


@needs_data
def test_evaluation_subsets_of_mnist_see_every_digit_block(tmp_path):
    # The test file is sorted by digit: the first 500 rows are zeros, an evenly spread 500 are not.
    test = load_dataset("mnist", data_dir=DATA, cache_dir=tmp_path).test.astype(np.float64)
    first, spread = test[:500].mean(0), test[D.evenly_spaced(len(test), 500)].mean(0)
    whole = test.mean(0)
    assert np.abs(spread - whole).mean() < 0.5 * np.abs(first - whole).mean()


# ----------------------------------------------------------------- bundled digits

def test_digits_load_with_their_documented_split_and_checksum():
    """The bundled file is scikit-learn's, byte for byte (sha256), and the split is the documented
    permutation: train/valid/test partition the 1797 images, in RandomState(0)'s order."""
    import gzip

    ds = load_dataset("digits")
    assert (ds.name, ds.levels, ds.image_shape, ds.dim) == ("digits", 17, (1, 8, 8), 64)
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (1197, 300, 300)
    path = resources.files("airvae").joinpath("bundled", D.DIGITS_FILE)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == D.DIGITS_SHA256
    with gzip.open(path, "rt") as f:
        table = np.array([[int(v) for v in line.split(",")] for line in f])
    assert table.shape == (1797, 65) and table[:, :64].min() == 0 and table[:, :64].max() == 16
    order = np.random.RandomState(0).permutation(1797)
    np.testing.assert_array_equal(np.concatenate([ds.train, ds.valid, ds.test]) * 16, table[order, :64])
    assert D.dataset_digest(ds) == "8c5e3921b2a90df9a25500b768fdccf40ed4edfa5784f7036904ed33354ee258"  # changes are caught


def test_tampered_digits_are_refused(monkeypatch, tmp_path):
    (tmp_path / "bundled").mkdir()
    (tmp_path / "bundled" / D.DIGITS_FILE).write_bytes(b"not the digits")
    monkeypatch.setattr(resources, "files", lambda package: tmp_path)
    with pytest.raises(DatasetError, match="checksum mismatch"):
        load_dataset("digits")


# ----------------------------------------------------------------- the package's layout

# The public names of airvae.data when it was one file: all still import from it.
NAMES_OF_THE_ONE_FILE_MODULE = (
    "Arrays", "CACHE_DIR_ENV", "DATASETS", "DATA_DIR_ENV", "DIGITS_FILE", "DIGITS_PROVENANCE", "DIGITS_SHA256",
    "DIGITS_SIZES", "Dataset", "DatasetError", "MAX_ARRAY_BYTES", "MAX_COMPRESSION_RATIO", "OMNIGLOT_DEVIATION",
    "RATIO_CHECKED_ABOVE", "SPLITS", "cache_root", "check_dataset_name", "dataset_digest", "evenly_spaced", "hashed",
    "load_dataset", "load_digits")


def test_names_of_the_one_file_module_still_import_from_airvae_data():
    from airvae import files

    assert [n for n in NAMES_OF_THE_ONE_FILE_MODULE if not hasattr(D, n)] == []
    assert all(hasattr(D, n) for n in D.__all__)
    assert D.hashed is files.hashed and D.load_dataset("digits").dim == 64


def test_package_modules_import_in_one_direction_and_no_private_names():
    """Module-level imports between airvae.data's modules form no cycle, none imports a private name
    of another, and airvae.files (which they use) imports nothing of airvae.data."""
    import ast

    folder = Path(D.__file__).parent
    edges = {}
    for path in sorted(folder.glob("*.py")):
        module = "__init__" if path.stem == "__init__" else path.stem
        edges[module] = set()
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, ast.ImportFrom) and node.level:
                assert not [a.name for a in node.names if a.name.startswith("_")], (path.name, node.module)
                if node.level == 1 and node.module:
                    edges[module].add(node.module)
    assert edges["dataset"] == set()

    def visit(module, path=()):
        assert module not in path, f"import cycle: {' -> '.join(path + (module,))}"
        for other in edges.get(module, ()):
            visit(other, path + (module,))

    for module in edges:
        visit(module)
    files_source = (folder.parent / "files.py").read_text()
    assert "from .data" not in files_source and "import data" not in files_source


# ----------------------------------------------------------------- torch views and the package root

def test_a_split_as_a_torch_dataset_gives_float_tensors_as_images_or_rows(tmp_path):
    import torch
    from torch.utils.data import DataLoader

    from airvae.data import TorchSplit

    digits = load_dataset("digits")  # 8x8 images of 17 grey levels, stored as rows of x / 16
    images = TorchSplit(digits, "train")  # image data: (C, H, W) unless asked otherwise
    assert len(images) == len(digits.train) and isinstance(images, torch.utils.data.Dataset)
    assert images[3].shape == (1, 8, 8) and images[3].dtype == torch.float32
    assert torch.equal(images[3].flatten(), torch.from_numpy(digits.train[3]))
    rows = next(iter(DataLoader(TorchSplit(digits, "test", image=False), batch_size=5)))
    assert rows.shape == (5, 64) and torch.equal(rows, torch.from_numpy(digits.test[:5]))

    binary = load_dataset(write_binary_npz(tmp_path / "binary.npz"))  # uint8 0/1 rows, no image shape
    view = TorchSplit(binary, "valid", device="cpu")
    assert view[0].dtype == torch.float32 and view[0].shape == (16,) and set(view.tensor.unique().tolist()) <= {0, 1}
    view.tensor[0] += 5  # a copy: the Dataset's arrays are never written through the view
    assert binary.valid.max() <= 1
    with pytest.raises(DatasetError, match="image_shape"):
        TorchSplit(binary, "train", image=True)
    with pytest.raises(DatasetError, match="unknown split"):
        TorchSplit(binary, "dev")


def write_binary_npz(path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, **{s: (rng.random((n, 16)) < 0.3).astype(np.uint8) for s, n in (("train", 20), ("valid", 6),
                                                                                  ("test", 6))})
    return path


def test_import_airvae_exposes_data_and_estimators_without_loading_matplotlib():
    """What a researcher's own loop needs is one ``import airvae`` away, and that import stays light."""
    import subprocess
    import sys

    code = ("import sys, airvae; "
            "assert airvae.estimators.iw_svi_log_likelihood is airvae.iw_svi_log_likelihood; "
            "assert airvae.data.load_dataset is airvae.load_dataset; "
            "assert airvae.load_dataset('digits').dim == 64 and airvae.TorchSplit and airvae.Estimate; "
            "assert {'data', 'estimators', 'load_dataset', 'TorchSplit', 'Dataset'} <= set(airvae.__all__); "
            "assert all(hasattr(airvae, name) for name in airvae.__all__); "
            "assert 'matplotlib' not in sys.modules, 'import airvae loaded matplotlib'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr[-2000:]

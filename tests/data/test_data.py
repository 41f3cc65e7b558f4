"""Tests for transferkit.data.datasets: decoding every image mode, the three dataset forms, transforms."""

from __future__ import annotations

import gzip
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images
from torch.utils.data import DataLoader

from transferkit.data.datasets import ImageDataset, open_dataset
from transferkit.data.decode import collate, decode_ahead, load_image
from transferkit.data.folders import IMAGE_EXTENSIONS
from transferkit.data.transforms import build_transform, describe_transform
from transferkit.errors import DataError

FASHION_T10K = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
HALF_CONFIG = {  # a timm-style pretrained config with easy arithmetic: (x - 0.5) / 0.5
    "input_size": (3, 224, 224),
    "interpolation": "bilinear",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "crop_pct": 0.875,
    "crop_mode": "center",
}


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """sklearn's china.jpg and flower.jpg, shrunk to 64x64 RGB for speed."""
    return [Image.fromarray(a).resize((64, 64), Image.BILINEAR) for a in load_sample_images()["images"]]


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int64)


def write_idx(path: Path, array: np.ndarray, magic: int) -> Path:
    """Write `array` in IDX format (big-endian magic and dims, then uint8 data), gzipped if path ends .gz."""
    data = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def make_folder(root: Path, photos: list[Image.Image], counts: dict[str, int]) -> Path:
    """An ImageFolder tree: `counts[name]` PNG files per class, alternating the two sample photos."""
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for k in range(n):
            photos[k % 2].save(root / name / f"{k:02d}.png")
    return root


# ---------------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK"])
def test_plain_modes_decode_to_rgb(tmp_path, photos, mode):
    src = photos[0].convert(mode)
    path = tmp_path / f"img_{mode}.{'tiff' if mode == 'CMYK' else 'png'}"
    src.save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (64, 64)
    np.testing.assert_array_equal(pixels(img), pixels(src.convert("RGB")))


def test_gray_and_one_bit_have_equal_channels(tmp_path, photos):
    photos[0].convert("1").save(tmp_path / "bw.png")
    values = pixels(load_image(tmp_path / "bw.png"))
    assert set(np.unique(values)) == {0, 255}
    assert (values[..., 0] == values[..., 1]).all() and (values[..., 1] == values[..., 2]).all()


def test_cmyk_pure_colours(tmp_path):
    Image.new("CMYK", (4, 4), (255, 0, 0, 0)).save(tmp_path / "cyan.tiff")
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(tmp_path / "white.tiff")
    assert load_image(tmp_path / "cyan.tiff").getpixel((0, 0)) == (0, 255, 255)
    assert load_image(tmp_path / "white.tiff").getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("ext", ["png", "gif"])
def test_palette_transparency_becomes_white(tmp_path, ext):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putpixel((1, 1), 1)
    img.save(tmp_path / f"p.{ext}", transparency=0)
    out = load_image(tmp_path / f"p.{ext}")
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)  # index 0 is transparent, not (10, 20, 30)
    assert out.getpixel((1, 1)) == (200, 100, 50)


def test_alpha_is_composited_on_white(tmp_path, photos):
    rgba = photos[0].convert("RGBA")
    alpha = np.zeros((64, 64), dtype=np.uint8)
    alpha[:, 32:] = 255
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(tmp_path / "rgba.png")
    out = pixels(load_image(tmp_path / "rgba.png"))
    assert (out[:, :32] == 255).all()
    np.testing.assert_array_equal(out[:, 32:], pixels(photos[0])[:, 32:])

    Image.new("LA", (2, 2), (0, 128)).save(tmp_path / "la.png")  # black at half opacity over white
    assert load_image(tmp_path / "la.png").getpixel((0, 0)) == (127, 127, 127)


@pytest.mark.parametrize(("mode", "ext"), [("I;16", "png"), ("I;16B", "tiff"), ("I;16", "tiff")])
def test_sixteen_bit_scales_by_bit_range(tmp_path, mode, ext):
    values = np.array([[0, 255, 256, 32768, 65280, 65535]], dtype=np.uint16)
    dtype = ">u2" if mode == "I;16B" else "<u2"
    Image.frombytes(mode, (6, 1), values.astype(dtype).tobytes()).save(tmp_path / f"g.{ext}")
    out = pixels(load_image(tmp_path / f"g.{ext}"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 0, 1, 128, 255, 255])
    assert (out[..., 0] == out[..., 2]).all()


def test_sixteen_bit_gradient(tmp_path):
    ramp = np.tile(np.arange(0, 65536, 257, dtype=np.uint16), (2, 1))  # 0, 257, ..., 65535: 256 steps
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    out = pixels(load_image(tmp_path / "ramp.png"))
    np.testing.assert_array_equal(out[0, :, 1], ramp[0] >> 8)
    assert out[0, -1, 0] == 255 and out[0, 128, 0] == 128  # 65535 -> 255, 32896 -> 128


def test_int32_mode_i_within_16_bits(tmp_path):
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32)).save(tmp_path / "i.tiff")
    assert Image.open(tmp_path / "i.tiff").mode == "I"
    np.testing.assert_array_equal(pixels(load_image(tmp_path / "i.tiff"))[0, :, 0], [0, 128, 255])


def test_float_mode(tmp_path):
    Image.fromarray(np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "unit.tiff")
    Image.fromarray(np.array([[0.0, 64.0, 128.0, 255.0]], dtype=np.float32)).save(tmp_path / "byte.tiff")
    np.testing.assert_array_equal(pixels(load_image(tmp_path / "unit.tiff"))[0, :, 0], [0, 64, 128, 255])
    np.testing.assert_array_equal(pixels(load_image(tmp_path / "byte.tiff"))[0, :, 0], [0, 64, 128, 255])


@pytest.mark.parametrize("ext", ["jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff"])
def test_extensions_round_trip(tmp_path, photos, ext):
    path = tmp_path / f"photo.{ext}"
    options = {"webp": {"lossless": True}, "jpg": {"quality": 95}, "jpeg": {"quality": 95}}
    photos[1].save(path, **options.get(ext, {}))
    out = pixels(load_image(path))
    assert out.shape == (64, 64, 3)
    if ext in ("jpg", "jpeg"):
        assert np.abs(out - pixels(photos[1])).mean() < 4
    elif ext == "gif":  # quantised to 256 colours on save: compare with what the file holds
        np.testing.assert_array_equal(out, pixels(Image.open(path).convert("RGB")))
    else:
        np.testing.assert_array_equal(out, pixels(photos[1]))
    assert f".{ext}" in IMAGE_EXTENSIONS


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (64, 32), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 16, 16))  # red marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rot.jpg")
    assert out.size == (32, 64)
    r, g, b = out.getpixel((24, 8))  # the marker moved to the top-right
    assert r > 200 and b < 60


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(tmp_path / "anim.gif").n_frames == 2
    assert load_image(tmp_path / "anim.gif").getpixel((4, 4)) == (255, 0, 0)


def test_bad_files_raise_data_error_naming_the_file(tmp_path, photos):
    photos[0].save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "x.jpg").write_text("not an image\n")
    with pytest.raises(DataError, match=r"cannot read image '.*half\.jpg': truncated file \(image file is"):
        load_image(tmp_path / "half.jpg")
    with pytest.raises(DataError, match=r"cannot read image '.*x\.jpg': not an image"):
        load_image(tmp_path / "x.jpg")
    with pytest.raises(DataError, match=r"cannot read image '.*gone\.png': file does not exist"):
        load_image(tmp_path / "gone.png")
    with pytest.raises(ValueError):  # DataError is also a ValueError
        load_image(tmp_path / "x.jpg")


# ---------------------------------------------------------------------------------------------- folder


def test_folder_order_recursion_and_ignored_files(tmp_path, photos):
    root = make_folder(tmp_path / "data", photos, {"dog": 2, "cat": 3})
    (root / "cat" / "nested").mkdir()
    photos[0].save(root / "cat" / "nested" / "deep.PNG")  # upper-case extension, found recursively
    photos[0].save(root / "cat" / ".hidden.png")
    (root / "cat" / ".cache").mkdir()
    photos[0].save(root / "cat" / ".cache" / "thumb.png")
    (root / "cat" / "notes.txt").write_text("ignored")
    (root / ".git").mkdir()
    photos[0].save(root / ".git" / "x.png")

    ds = open_dataset(root)
    assert isinstance(ds, ImageDataset) and isinstance(ds, torch.utils.data.Dataset)
    assert ds.kind == "folder" and ds.root == str(root)
    assert ds.classes == ["cat", "dog"]
    names = [Path(s).relative_to(root).as_posix() for s in ds.sources]
    cats = ["cat/00.png", "cat/01.png", "cat/02.png", "cat/nested/deep.PNG"]  # sorted: "0" < "n"
    assert names == [*cats, "dog/00.png", "dog/01.png"]
    assert ds.targets.dtype == np.int64 and ds.targets.tolist() == [0, 0, 0, 0, 1, 1]
    x, label, i, err = ds[5]
    assert x.dtype == torch.uint8 and x.shape == (3, 64, 64) and (label, i, err) == (1, 5, "")
    np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), pixels(photos[1]))


def test_empty_class_folder_is_named(tmp_path, photos):
    root = make_folder(tmp_path / "data", photos, {"dog": 1})
    (root / "cat").mkdir()
    (root / "cat" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError) as info:
        open_dataset(root)
    assert str(info.value) == f"class folder '{root / 'cat'}' has no images ({', '.join(IMAGE_EXTENSIONS)})"


def test_too_few_classes(tmp_path, photos):
    root = make_folder(tmp_path / "data", photos, {"only": 2})
    with pytest.raises(DataError, match=rf"'{root}' has 1 class folder\(s\); need at least 2"):
        open_dataset(root)
    assert len(open_dataset(root, min_classes=1)) == 2


def test_unknown_paths_list_accepted_forms(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    for bad in (tmp_path / "missing", tmp_path / "notes.txt"):
        with pytest.raises(DataError, match=rf"cannot open dataset '{bad}'.*ImageFolder.*CSV.*IDX"):
            open_dataset(bad)


def test_skip_bad_and_collate(tmp_path, photos):
    root = make_folder(tmp_path / "data", photos, {"a": 2, "b": 2})
    (root / "a" / "01.png").write_text("corrupt")
    strict = open_dataset(root)
    with pytest.raises(DataError, match=r"01\.png"):
        strict[1]
    ds = open_dataset(root, skip_bad=True, transform=build_transform(HALF_CONFIG, image_size=32))
    x, label, i, msg = ds[1]
    assert x is None and (label, i) == (0, 1)
    assert msg.startswith("cannot read image '") and "01.png" in msg

    x, y, idx, bad = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate)))
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    assert y.tolist() == [0, 1, 1] and idx.tolist() == [0, 2, 3] and y.dtype == idx.dtype == torch.int64
    assert bad == [(1, msg)]

    x, y, idx, bad = collate([ds[1], ds[1]])
    assert x is None and y.numel() == 0 and idx.numel() == 0 and len(bad) == 2


def test_subset_and_with_transform(tmp_path, photos):
    ds = open_dataset(make_folder(tmp_path / "data", photos, {"a": 5, "b": 2, "c": 4}))
    sub = ds.subset(3)
    expected = [f"{c}/{k:02d}.png" for c, n in [("a", 3), ("b", 2), ("c", 3)] for k in range(n)]
    assert [Path(s).relative_to(ds.root).as_posix() for s in sub.sources] == expected
    assert sub.targets.tolist() == [0, 0, 0, 1, 1, 2, 2, 2] and sub.classes is ds.classes
    assert len(ds) == 11  # the original is untouched
    with pytest.raises(DataError, match="per_class"):
        ds.subset(0)

    tf = build_transform(HALF_CONFIG, image_size=16)
    other = ds.with_transform(tf)
    assert other.transform is tf and ds.transform is None and other.sources is ds.sources
    assert other[0][0].shape == (3, 16, 16)
    clone = pickle.loads(pickle.dumps(other))  # DataLoader workers pickle the dataset
    torch.testing.assert_close(clone[3][0], other[3][0])


# ---------------------------------------------------------------------------------------------- CSV


def test_csv_manifest(tmp_path, photos):
    (tmp_path / "img").mkdir()
    for k, photo in enumerate(photos):
        photo.save(tmp_path / "img" / f"p{k}.png")
    elsewhere = tmp_path / "other" / "abs.png"
    elsewhere.parent.mkdir()
    photos[0].save(elsewhere)
    lines = ["id,path,label,note", "1,img/p0.png,zebra,x", "2,img/p1.png,ant,", f"3,{elsewhere},zebra,abs"]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")

    ds = open_dataset(tmp_path / "m.csv")
    assert ds.kind == "csv" and ds.classes == ["ant", "zebra"]
    assert ds.targets.tolist() == [1, 0, 1]
    assert ds.sources == [str(tmp_path / "img" / "p0.png"), str(tmp_path / "img" / "p1.png"), str(elsewhere)]
    np.testing.assert_array_equal(pixels(ds.image(1)), pixels(photos[1]))


def test_csv_missing_files_reported_with_line(tmp_path, photos):
    photos[0].save(tmp_path / "ok.png")
    rows = ["path,label", "ok.png,a", "ok.png,b", "img/x.png,a", "ok.png,b", "img/y.png,b"]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError) as info:
        open_dataset(tmp_path / "m.csv")
    expected = f"manifest '{tmp_path / 'm.csv'}' line 4: file 'img/x.png' does not exist (1 more missing)"
    assert str(info.value) == expected


def test_csv_bad_structure(tmp_path):
    (tmp_path / "nolabel.csv").write_text("path,class\na.png,x\n")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("path,label\n")
    with pytest.raises(DataError, match=r"'.*nolabel\.csv' has no 'label' column \(columns: path, class\)"):
        open_dataset(tmp_path / "nolabel.csv")
    with pytest.raises(DataError, match=r"manifest '.*empty\.csv' is empty"):
        open_dataset(tmp_path / "empty.csv")
    with pytest.raises(DataError, match=r"manifest '.*header\.csv' has a header but no rows"):
        open_dataset(tmp_path / "header.csv")


# ---------------------------------------------------------------------------------------------- IDX


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    return (d.images[:60] * 15).astype(np.uint8), d.target[:60].astype(np.uint8)  # 0..16 -> 0..240


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, digits, suffix):
    images, labels = digits
    img_file = write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images, 0x803)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, 0x801)
    for path in (tmp_path / "train", img_file):  # prefix form and file form
        ds = open_dataset(path)
        assert ds.kind == "idx" and len(ds) == 60 and ds.classes == [str(k) for k in range(10)]
        assert ds.targets.dtype == np.int64 and ds.targets.tolist() == labels.tolist()
        assert ds.sources[7] == f"{img_file}#7"
        for i in (0, 7, 59):
            img = ds.image(i)
            assert img.mode == "RGB" and img.size == (8, 8)
            np.testing.assert_array_equal(pixels(img)[..., 0], images[i])
        np.testing.assert_array_equal(ds[3][0][1].numpy(), images[3])


def test_idx_class_names_file(tmp_path, digits):
    images, labels = digits
    write_idx(tmp_path / "t-images-idx3-ubyte", images, 0x803)
    write_idx(tmp_path / "t-labels-idx1-ubyte", labels, 0x801)
    names = [f"name{k}" for k in range(10)]
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    assert open_dataset(tmp_path / "t").classes == names
    (tmp_path / "classes.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match=r"classes\.txt' lists 2 class names; the labels go up to 9"):
        open_dataset(tmp_path / "t")
    (tmp_path / "classes.txt").write_text("\n".join([*names[:9], "name3"]) + "\n")
    with pytest.raises(DataError, match="'name3' is listed twice"):
        open_dataset(tmp_path / "t")
    (tmp_path / "classes.txt").write_text("\n".join([*names[:4], " ", *names[5:]]) + "\n")
    with pytest.raises(DataError, match="line 5 is empty"):
        open_dataset(tmp_path / "t")


@pytest.mark.skipif(not FASHION_T10K.exists(), reason="needs dataset-fashion-mnist")
def test_known_idx_sets_get_their_class_names(tmp_path):
    """Fashion-MNIST is known by its labels' content (wherever the files are); a changed copy is not, and a
    classes.txt beside the files wins over both."""
    ds = open_dataset(FASHION_T10K.with_name("t10k"))
    assert ds.classes[0] == "T-shirt/top" and ds.classes[7] == "Sneaker" and len(ds.classes) == 10
    images = gzip.decompress(FASHION_T10K.read_bytes())
    labels = bytearray(gzip.decompress(FASHION_T10K.with_name("t10k-labels-idx1-ubyte.gz").read_bytes()))
    (tmp_path / "c-images-idx3-ubyte").write_bytes(images)
    (tmp_path / "c-labels-idx1-ubyte").write_bytes(bytes(labels))  # a copy, uncompressed: still known
    assert open_dataset(tmp_path / "c").classes[9] == "Ankle boot"
    labels[8] = (labels[8] + 1) % 10  # one label changed: no longer the known set
    (tmp_path / "c-labels-idx1-ubyte").write_bytes(bytes(labels))
    assert open_dataset(tmp_path / "c").classes == [str(k) for k in range(10)]
    (tmp_path / "classes.txt").write_text("\n".join(f"mine{k}" for k in range(10)))
    assert open_dataset(tmp_path / "c").classes[7] == "mine7"


def test_unreadable_dataset_folder_is_one_line(photo_folder, monkeypatch):
    """As root no folder is unreadable, so the refusal is simulated where the folder is listed."""
    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", refuse)
    with pytest.raises(DataError, match="cannot list dataset folder .*Permission denied"):
        open_dataset(photo_folder)


def test_bad_idx_files(tmp_path, digits):
    images, labels = digits
    img = write_idx(tmp_path / "a-images-idx3-ubyte", images, 0x803)
    lab = write_idx(tmp_path / "a-labels-idx1-ubyte", labels, 0x801)
    write_idx(img, images, 0x801)
    with pytest.raises(DataError, match=rf"IDX file '{img}' has magic 0x00000801; expected 0x00000803"):
        open_dataset(img)
    img.write_bytes(write_idx(img, images, 0x803).read_bytes()[:-10])
    with pytest.raises(DataError, match=rf"'{img}' has 3830 data bytes; dimensions \(60, 8, 8\) need 3840"):
        open_dataset(img)
    img.write_bytes(b"\x00\x00\x08\x03\x00\x00")
    with pytest.raises(DataError, match=rf"IDX file '{img}' is truncated"):
        open_dataset(img)
    write_idx(img, images, 0x803)
    write_idx(lab, labels[:50], 0x801)
    with pytest.raises(DataError, match=rf"'{img}' has 60 images but labels file '{lab}' has 50 labels"):
        open_dataset(img)
    lab.unlink()
    with pytest.raises(DataError, match=rf"'{img}' has no labels file '{lab}'"):
        open_dataset(img)


@pytest.mark.skipif(not FASHION_T10K.exists(), reason=f"{FASHION_T10K} is not installed")
def test_fashion_mnist_t10k():
    ds = open_dataset(FASHION_T10K.parent / "t10k")
    assert len(ds) == 10000 and ds.image(0).size == (28, 28)
    assert np.bincount(ds.targets).tolist() == [1000] * 10
    with gzip.open(FASHION_T10K.parent / "t10k-labels-idx1-ubyte.gz") as f:  # labels start after 8 bytes
        assert ds.targets.tolist() == list(f.read()[8:])
    sub = ds.subset(10)
    first = np.sort(np.concatenate([np.flatnonzero(ds.targets == c)[:10] for c in range(10)]))
    assert len(sub) == 100 and sub.sources == [ds.sources[i] for i in first]
    assert sub.targets.tolist() == ds.targets[first].tolist()
    np.testing.assert_array_equal(pixels(sub.image(99)), pixels(ds.image(int(first[99]))))


# ---------------------------------------------------------------------------------------------- transforms


def test_build_transform_normalises_and_resizes_whole_image():
    white = Image.new("RGB", (28, 28), (255, 255, 255))
    x = build_transform(HALF_CONFIG, image_size=64)(white)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.ones(3, 64, 64))  # (1 - 0.5) / 0.5

    framed = Image.new("RGB", (256, 256), (0, 0, 0))
    framed.paste((255, 255, 255), (16, 16, 240, 240))  # white inside a 16-pixel black frame
    whole = build_transform(HALF_CONFIG, image_size=64)(framed)
    assert whole[:, 0, 0].tolist() == [-1.0, -1.0, -1.0]  # nothing cropped: the frame is still there
    cropped = build_transform(HALF_CONFIG)(framed)  # 224 / 0.875 = 256 -> centre 224: frame cropped off
    assert cropped.shape == (3, 224, 224)
    torch.testing.assert_close(cropped, torch.ones(3, 224, 224))

    train = build_transform(HALF_CONFIG, image_size=32, train=True)(framed)
    assert train.shape == (3, 32, 32)
    with pytest.raises(DataError, match="image_size"):
        build_transform(HALF_CONFIG, image_size=0)


def test_describe_transform():
    desc = describe_transform(HALF_CONFIG, image_size=96)
    assert json.loads(json.dumps(desc)) == {
        "input_size": [3, 96, 96],
        "interpolation": "bilinear",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    assert describe_transform(HALF_CONFIG)["input_size"] == [3, 224, 224]
    assert describe_transform(HALF_CONFIG)["crop_pct"] == 0.875


def test_decode_ahead_keeps_order_raises_and_stops(photo_folder):
    """The background decoder yields what the loader yields, in order; an error in it is raised in the consumer;
    leaving early stops its thread."""
    import threading

    dataset = open_dataset(photo_folder).with_transform(lambda img: torch.from_numpy(np.array(img.resize((8, 8)))))
    loader = torch.utils.data.DataLoader(dataset, batch_size=3)
    want = [x for x, *_ in loader]
    got = [x for x, *_ in decode_ahead(loader)]
    assert len(got) == len(want) == 6 and all(torch.equal(a, b) for a, b in zip(got, want))

    def broken():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(decode_ahead(broken()))
    ahead = decode_ahead(iter(range(1000)), depth=2)
    assert next(ahead) == 0
    ahead.close()
    assert not any(t.name == "transferkit-decode" and t.is_alive() for t in threading.enumerate())

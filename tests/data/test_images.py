import numpy as np
import pytest
import torch
from PIL import Image

from geomoe.data.datasets import batches_of
from geomoe.data.images import BadImage, DecodedCache, ImageConfig, ImageFiles, augmenter, decode


def write_photo(path, width=640, height=480, seed=0):
    rng = np.random.default_rng(seed)
    pixels = np.kron(rng.random((height // 16, width // 16, 3)), np.ones((16, 16, 1)))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((pixels * 255).astype(np.uint8)).save(path, quality=90)
    return path


def test_reduced_decoding_gives_the_model_input_and_matches_full_decoding(tmp_path):
    photo = write_photo(tmp_path / "a.jpg")
    reduced, full = decode(photo, 224), decode(photo, 224, reduced=False)
    assert reduced.shape == full.shape == (224, 224, 3) and reduced.dtype == np.uint8
    assert np.abs(reduced.astype(int) - full.astype(int)).mean() < 12  # same picture, decoded at 1/2 scale
    with Image.open(photo) as image:
        image.draft("RGB", (224, 224))
        assert image.size == (320, 240)  # libjpeg's DCT scaling: the smallest scale that still covers 224


@pytest.mark.parametrize("content,reason", [(None, "no such image file"), (b"not a jpeg", "cannot be decoded")])
def test_a_bad_file_is_named(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BadImage, match=f"bad.jpg: {reason}"):
        decode(path, 64)


def test_a_truncated_jpeg_is_a_counted_skip_not_a_crash(tmp_path):
    good = [write_photo(tmp_path / f"{i}.jpg", 96, 96, seed=i).name for i in range(3)]
    data = (tmp_path / "0.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    files = [*good, "cut.jpg", "missing.jpg"]
    items = ImageFiles(tmp_path, files, np.arange(5), ImageConfig(size=32))
    seen = [label for batch in batches_of(items, 2) if batch is not None for label in batch[1].tolist()]
    assert seen == [0, 1, 2]
    assert items.skipped == {"unreadable image": 2}


def test_the_cache_is_built_once_and_holds_the_decoded_pixels(tmp_path):
    files = [write_photo(tmp_path / "img" / f"{i}.jpg", 200, 150, seed=i).name for i in range(4)]
    (tmp_path / "img" / "bad.jpg").write_bytes(b"junk")
    files.append("bad.jpg")
    cache = DecodedCache(tmp_path / "cache", tmp_path / "img", files, 48)
    assert cache.pixels.shape == (5, 48, 48, 3) and isinstance(cache.pixels, np.memmap)
    np.testing.assert_array_equal(cache.pixels[2], decode(tmp_path / "img" / files[2], 48))
    assert list(cache.bad) == [4] and "bad.jpg" in cache.bad[4]
    stamp = cache.path.stat().st_mtime_ns
    (tmp_path / "img" / files[0]).unlink()  # a second opening reads the cache, not the files
    again = DecodedCache(tmp_path / "cache", tmp_path / "img", files, 48)
    assert again.path.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(again.pixels[0], cache.pixels[0])
    cached = ImageFiles(tmp_path / "img", files, np.arange(5), ImageConfig(size=48, cache=str(tmp_path / "cache")))
    assert cached[0][0].shape == (3, 48, 48) and cached[4] is None


def test_augmentation_is_reproducible_and_keeps_the_shape():
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    cfg = ImageConfig(augment="crop+flip")
    a = [augmenter(cfg, torch.Generator().manual_seed(3))(image) for _ in range(2)]
    assert a[0].shape == image.shape and a[0].dtype == torch.uint8
    assert torch.equal(a[0], a[1])
    assert not torch.equal(a[0], image)
    flip_only = augmenter(ImageConfig(augment="flip"), torch.Generator().manual_seed(0))
    outputs = [flip_only(image) for _ in range(8)]
    assert all(out.equal(image) or out.flip(-1).equal(image) for out in outputs)
    assert {out.equal(image) for out in outputs} == {True, False}  # flipped at p = 0.5


def test_normalisation_follows_the_config():
    from geomoe.data.images import to_tensor

    pixels = np.full((2, 2, 3), 255, dtype=np.uint8)
    assert torch.equal(to_tensor(pixels, ImageConfig()), torch.ones(3, 2, 2))
    imagenet = ImageConfig(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    torch.testing.assert_close(
        to_tensor(pixels, imagenet)[:, 0, 0], (1 - torch.tensor(imagenet.mean)) / torch.tensor(imagenet.std)
    )

"""Reading and writing media (images, videos, masks, SVG) at any fsspec URI.

Every reader fetches the whole file as bytes and decodes from memory, and every writer encodes into
memory and then stores the bytes, so local paths, `file://`, `memory://` and object stores all take
the same code path. Kept free of ray and torch so that it imports anywhere.
"""

from __future__ import annotations

import io
import os
import posixpath
import re
import uuid
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from fractions import Fraction
from typing import IO, Any

import av
import defusedxml
import defusedxml.ElementTree as DefusedElementTree
import fsspec
import numpy as np
import numpy.typing as npt
from fsspec.core import OpenFile, url_to_fs
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, ImageOps, UnidentifiedImageError

try:
    import decord
except ImportError:  # no decord wheels for some platforms (e.g. macOS arm64); PyAV then decodes all
    decord = None

# A PUT to these is atomic on its own, and they have no cheap rename.
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"})
SVG_NAMESPACE = "http://www.w3.org/2000/svg"
# ITU-R BT.601 weights, the ones PIL uses for "L".
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_JPEG_QUALITY = 95
_X264_CRF = "18"
# Inputs that pretend to be media: refused with a clear error before they can take an actor's memory.
MAX_INPUT_BYTES = 2 * 2**30  # one input file, fetched whole
MAX_IMAGE_PIXELS = 64 * 2**20  # per frame (8192²); PIL's own bomb check allows 89M and warns only
MAX_DECODED_BYTES = 4 * 2**30  # the RGB frames one read may return
MAX_SVG_BYTES = 10 * 2**20
# Elements of an SVG once its <use> references are expanded: ten <use> of ten <use> ... of a path make
# 10^k paths from a kilobyte (svgelements took 33 s and 1.2 GB for 10^5).
MAX_SVG_ELEMENTS = 20_000
_READ_PIECE = 16 * 2**20  # bytes per read of an input
# Small files (Parquet footers, run records) read at once: an object store answers each in tens of ms.
PARALLEL_READS = 16


class MediaError(Exception):
    """An input that cannot be used: missing, unreadable, corrupt or of the wrong kind.

    Row actors report it as the row's error instead of a crash, so messages name the URI.
    """


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    height: int
    width: int
    fps: float


# -- files ----------------------------------------------------------------------------------------


def open_file(uri: str, mode: str = "rb") -> OpenFile:
    """Open for streaming; writes through this are not atomic, so outputs should use `atomic_write`."""
    return fsspec.open(uri, mode)


def exists(uri: str) -> bool:
    fs, path = url_to_fs(uri)
    return fs.exists(path)


def remove(uri: str) -> None:
    """Delete a file; a file that is already gone is fine, since two workers may clean up the same one."""
    fs, path = url_to_fs(uri)
    with suppress(FileNotFoundError):
        fs.rm_file(path)


def remove_tree(uri: str) -> None:
    """Delete a folder and what it holds; a folder that is not there is fine."""
    fs, path = url_to_fs(uri)
    if fs.exists(path):
        with suppress(FileNotFoundError):
            fs.rm(path, recursive=True)


def is_url_chain(uri: str) -> bool:
    """fsspec reads '::' as a chain of filesystems, each over the next ('simplecache::s3://b/k')."""
    return "::" in uri


def _read(uri: str, what: str, limit: int = MAX_INPUT_BYTES) -> bytes:
    """An input's bytes (`_read_bounded`), named by a manifest, which may name any path or URL but no
    fsspec URL chain: caches copy the whole object to local disk, outside OUTPUT (a server that never
    stopped sending filled the disk), and reference files and archives are fetched or indexed whole
    when the chain is opened, all before any bound applies. Inputs are named on their own store."""
    _refuse_url_chain(uri, what)
    return _read_bounded(uri, what, limit)


def _refuse_url_chain(uri: str, what: str) -> None:
    if is_url_chain(uri):
        raise MediaError(
            f"{what} {uri} is an fsspec URL chain ('::'), which may fetch, copy to local disk or index "
            "whole objects before anima's size limits apply; name the file on its own store"
        )


def _read_bounded(uri: str, what: str, limit: int = MAX_INPUT_BYTES) -> bytes:
    """The file's bytes, at most `limit`. Only errors that retrying cannot fix become MediaError; network
    faults propagate so the task retries.

    A pipe would block the read forever and a device such as /dev/zero would fill memory, so only
    regular files are read (fsspec's type "file"). The size a store reports is checked first but not
    trusted (an HTTP server may send more than it said, a stream or a /proc file says nothing or 0): no
    read goes past one byte over the limit.
    """
    fs, path = _input_filesystem(uri, what)
    try:
        info = fs.info(path)
        if info.get("type") == "directory":  # an object store's prefix too, whose size is 0
            raise MediaError(f"cannot read {what} {uri}: it is a directory")
        if info.get("type") != "file":
            raise MediaError(
                f"{what} {uri} is not a regular file (a pipe, device or socket: fsspec type "
                f"{info.get('type')!r}); not reading it"
            )
        if (info.get("size") or 0) > limit:
            raise MediaError(
                f"{what} {uri} is {info['size'] / 2**20:.0f} MiB, over the {limit / 2**20:.0f} MiB limit"
            )
        chunks, total = [], 0
        # Over HTTP one streamed GET (block_size 0): fsspec's range reads fail on servers without Range
        # support, cut gzip-encoded bodies to their compressed length, and take a 206 body whole.
        streamed = {"block_size": 0} if "http" in _protocols(fs) else {}
        with fs.open(path, "rb", **streamed) as file:  # in pieces: a read of n bytes may set aside n at once
            while total <= limit and (chunk := file.read(min(limit + 1 - total, _READ_PIECE))):
                chunks.append(chunk)
                total += len(chunk)
        if total > limit:
            raise MediaError(f"{what} {uri} is over the {limit / 2**20:.0f} MiB limit")
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    except FileNotFoundError:
        raise MediaError(f"{what} not found: {uri}") from None
    except (IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        raise MediaError(f"cannot read {what} {uri}: {exc}") from exc


def _input_filesystem(uri: str, what: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of an input a row names; a URI that no filesystem takes is the row's own
    error (MediaError), not a crash that a rerun would retry."""
    try:
        return url_to_fs(uri)
    except Exception as exc:  # an unknown protocol, one missing its options (zip://x: IsADirectoryError)
        raise MediaError(f"cannot open {what} {uri}: {type(exc).__name__}: {exc}") from exc


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    """The names a filesystem answers to ("s3", "s3a"; "http", "https")."""
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def read_bytes(uri: str) -> bytes:
    """A file of anima's own or the user's (markers, checkpoints, adapters): URL chains allowed."""
    return _read_bounded(uri, "file")


def read_bytes_if_exists(uri: str) -> bytes | None:
    """`read_bytes`, or None when there is no such file, also one removed while it was read (a marker or
    lease that another process cleared). Asks whether it exists only when the read fails."""
    try:
        return read_bytes(uri)
    except MediaError:
        if exists(uri):
            raise
        return None


def join(base: str, *parts: str) -> str:
    """Join with "/" on every platform, since the base may be a URL; slashes at part ends are dropped."""
    out = base
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}{part}" if out.endswith("/") else f"{out}/{part}"
    return out


def _path_of(uri: str) -> str:
    _, sep, rest = uri.partition("://")
    return posixpath.normpath(rest if sep else uri)


def join_under(base: str, *parts: str) -> str:
    """`join`, refusing a result that does not lie inside `base` (a part such as '..' or a row id's
    '../../x') or that fsspec would cut short ('::' chains URLs: 'a::1' opens 'a'), so that no name
    taken from input data can make anima write outside its output, or over another row's files in it."""
    out = join(base, *parts)
    root, inner = _path_of(base), _path_of(out)
    if any("::" in part for part in parts):
        raise ValueError(f"{'/'.join(parts)!r} holds '::', fsspec's URL chaining; refusing it as a path")
    if inner == root or not inner.startswith(root.rstrip("/") + "/") or "\x00" in out:
        raise ValueError(f"{'/'.join(parts)!r} leads outside {base}; refusing to use it as a path there")
    return out


@contextmanager
def atomic_write(uri: str) -> Iterator[IO[bytes]]:
    """Yield a binary file whose bytes appear at `uri` all at once, and only if the block succeeds.

    Readers (resumed jobs, other workers) then never see a half-written output. Local and other
    filesystems get a hidden temporary sibling that is renamed; object stores get one PUT of a buffer.
    """
    fs, path = url_to_fs(uri)
    if set(_protocols(fs)) & _OBJECT_STORES:
        buffer = io.BytesIO()
        yield buffer
        fs.pipe_file(path, buffer.getvalue())
        return

    parent, name = posixpath.split(path)
    fs.makedirs(parent, exist_ok=True)
    temp = posixpath.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        with fs.open(temp, "wb") as f:
            yield f
        if isinstance(fs, LocalFileSystem):
            os.replace(temp, path)
        else:
            fs.mv(temp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            fs.rm_file(temp)
        raise


def write_bytes(data: bytes, uri: str) -> str:
    with atomic_write(uri) as f:
        f.write(data)
    return uri


def write_text(text: str, uri: str) -> str:
    return write_bytes(text.encode("utf-8"), uri)


# -- images ---------------------------------------------------------------------------------------


def _to_rgb(image: Image.Image) -> Image.Image:
    # Transparent areas become white, the background the sketch and image methods assume.
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


_RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def fit_frame(
    frame: npt.NDArray[np.uint8], size: tuple[int, int], resample: str = "bicubic"
) -> npt.NDArray[np.uint8]:
    """Scale to cover `size` (h, w) and crop the centre, so content is never stretched; `resample`
    "bilinear" is torchvision's Resize + CenterCrop of PIL images, as official inference scripts use."""
    h, w = size
    fitted = ImageOps.fit(Image.fromarray(frame), (w, h), method=_RESAMPLING[resample])
    return np.asarray(fitted)


def _stack(uri: str, frames: Iterable[npt.NDArray[np.uint8]], count: int) -> npt.NDArray[np.uint8]:
    """The `count` frames, decoded one at a time: the whole stack's size is checked from the first one's
    before the next is decoded, and each must match it (frames of separate files: a mask folder)."""
    stacked: list[npt.NDArray[np.uint8]] = []
    for frame in frames:
        if stacked and frame.shape != stacked[0].shape:
            raise MediaError(f"frames of {uri} differ in size")
        stacked.append(frame)
        check_decoded(uri, count, *frame.shape[:2])
    return np.stack(stacked)


def check_decoded(uri: str, frames: int, height: int, width: int) -> None:
    """Refuse sizes that would take the actor's memory (decompression bombs, endless animations, and the
    frame sizes a row asks for: `params.check_frame_size`)."""
    if height * width > MAX_IMAGE_PIXELS:
        raise MediaError(
            f"{uri} has {width}x{height}-pixel frames, over the {MAX_IMAGE_PIXELS:,}-pixel limit"
        )
    if frames * height * width * 3 > MAX_DECODED_BYTES:
        raise MediaError(
            f"{uri}: {frames} frames of {width}x{height} would decode to over "
            f"{MAX_DECODED_BYTES / 2**30:.0f} GiB"
        )


def _decode_images(
    uri: str, data: bytes, what: str, frames: Callable[[int], list[int]] | None = None
) -> npt.NDArray[np.uint8] | None:
    """(F,H,W,3) RGB of a file PIL recognises by its content; None when it is no image at all. The
    first frame, or those `frames` picks (sorted, unique) given the file's frame count.

    Sizes are checked from the headers before any pixel is decoded: the first frame's for them all, and
    each frame's before it is decoded (a TIFF's pages may each have their own size).
    """
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return None
    except _PIL_ERRORS as exc:
        raise _image_error(uri, what, exc) from exc
    with image:
        try:  # a damaged animation can fail while its frames are counted: only masks count them
            count = getattr(image, "n_frames", 1) if frames else 1
        except _PIL_ERRORS as exc:
            raise _image_error(uri, what, exc) from exc
        picked = frames(count) if frames else [0]
        check_decoded(uri, len(picked), image.height, image.width)
        size, decoded = image.size, []
        for n in picked:
            try:
                image.seek(n)
                if image.size != size:
                    raise MediaError(f"frames of {uri} differ in size")
                decoded.append(np.asarray(_to_rgb(ImageOps.exif_transpose(image))))
            except _PIL_ERRORS as exc:
                raise _image_error(uri, what, exc) from exc
    return np.stack(decoded)


# What PIL raises on damaged files besides OSError: truncated animations fail with IndexError, TypeError
# or EOFError while their frames are counted or sought.
_PIL_ERRORS = (
    Image.DecompressionBombError,
    OSError,
    ValueError,
    SyntaxError,
    TypeError,
    IndexError,
    EOFError,
)


def _image_error(uri: str, what: str, exc: Exception) -> MediaError:
    if isinstance(exc, Image.DecompressionBombError):
        return MediaError(f"cannot decode {what} {uri}: over the pixel limit (a decompression bomb?): {exc}")
    return MediaError(f"cannot decode {what} {uri}: {exc}")


def _read_still(uri: str, what: str, max_bytes: int = MAX_INPUT_BYTES) -> npt.NDArray[np.uint8]:
    frames = _decode_images(uri, _read(uri, what, max_bytes), what)
    if frames is None:
        raise MediaError(f"not an image file: {uri}")
    return frames[0]


def read_image(
    uri: str,
    size: tuple[int, int] | None = None,
    resample: str = "bicubic",
    max_bytes: int = MAX_INPUT_BYTES,
) -> npt.NDArray[np.uint8]:
    """(H,W,3) RGB (an animation's first frame); the format is sniffed from the bytes, not the name.
    `size` (h, w) covers and crops (`fit_frame`)."""
    frame = _read_still(uri, "image", max_bytes)
    return frame if size is None or frame.shape[:2] == tuple(size) else fit_frame(frame, size, resample)


def _to_pil(frame: npt.NDArray[Any]) -> Image.Image:
    frame = np.asarray(frame)
    if frame.dtype == np.bool_:
        frame = frame.astype(np.uint8) * 255
    if frame.dtype != np.uint8 or not (frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] in (3, 4))):
        raise ValueError(f"expected a uint8 (H,W), (H,W,3) or (H,W,4) frame, got {frame.dtype} {frame.shape}")
    return Image.fromarray(frame)


def write_image(frame: npt.NDArray[Any], uri: str) -> str:
    """Write one frame in the format its extension names; bool masks are stored as 0/255."""
    fmt = Image.registered_extensions().get(posixpath.splitext(uri)[1].lower())
    if fmt is None:
        raise ValueError(f"no image format for the extension of {uri}")
    buffer = io.BytesIO()
    _to_pil(frame).save(buffer, format=fmt, **({"quality": _JPEG_QUALITY} if fmt == "JPEG" else {}))
    return write_bytes(buffer.getvalue(), uri)


def write_png_frames(frames: Sequence[npt.NDArray[Any]] | npt.NDArray[Any], dir_uri: str) -> list[str]:
    """Write frame_0000.png, ... into a folder; each file is atomic, the folder as a whole is not."""
    return [write_image(frame, join(dir_uri, f"frame_{i:04d}.png")) for i, frame in enumerate(frames)]


# -- videos ---------------------------------------------------------------------------------------


def frame_indices(total: int, count: int) -> npt.NDArray[np.int64]:
    """`count` indices spread evenly over `total` frames, first and last included."""
    if not 1 <= count <= total:
        raise ValueError(f"cannot pick {count} frames out of {total}")
    return np.linspace(0, total - 1, count).round().astype(np.int64)


def strided_indices(total: int, count: int, start: int = 0, stride: int = 1) -> npt.NDArray[np.int64]:
    """`count` frames `stride` apart from `start`: with stride 1, consecutive at the clip's native rate,
    as video-editing methods take their clips (not spread over the whole clip)."""
    if count < 1 or start < 0 or stride < 1:
        raise ValueError(
            f"need num_frames >= 1, start_frame >= 0, frame_stride >= 1; got {count}, {start}, {stride}"
        )
    need = start + (count - 1) * stride + 1
    if need > total:
        raise ValueError(
            f"video has {total} frames, {count} requested from frame {start} every {stride} "
            f"(needs {need}; lower start_frame, frame_stride or num_frames)"
        )
    return start + stride * np.arange(count, dtype=np.int64)


def _pick(uri: str, total: int, num_frames: int | None, indices: Sequence[int] | None = None) -> list[int]:
    if indices is not None:
        if len(indices) and max(indices) >= total:
            raise MediaError(f"video has {total} frames, frame {max(indices)} requested: {uri}")
        return [int(i) for i in indices]
    if num_frames is None:
        return list(range(total))
    if num_frames > total:
        raise MediaError(f"video has {total} frames, {num_frames} requested: {uri}")
    return frame_indices(total, num_frames).tolist()


def _decoder_pixels() -> int:
    """The most pixels a decoder may allocate for a frame: a little over the limit, as decoders count
    their padded buffers (a 32x32 MPEG-4 frame was refused under 3,071). Frame sizes are checked
    exactly."""
    return MAX_IMAGE_PIXELS + MAX_IMAGE_PIXELS // 16 + 2**16


def _open_video(data: bytes, max_pixels: int | None = None, **codec_options: str) -> Any:
    """A PyAV container whose probe refuses frames over `max_pixels` (`_decoder_pixels`): opening a
    container decodes its first frame to learn the stream (330 MB for a 424 KB clip of one 12000x12000
    frame). Tags that are not UTF-8 are replaced, as decord reads such clips."""
    options = {"max_pixels": str(max_pixels or _decoder_pixels()), **codec_options}
    return av.open(io.BytesIO(data), options=options, metadata_errors="replace")  # options: every stream


def _check_frame_size(uri: str, data: bytes) -> bool:
    """Whether decord may open the clip: no video stream of it has frames over the pixel limit (refused:
    MediaError), and their size is known. decord decodes a first frame on opening, and that clip took
    1.75 GB there.

    The size is the container's word where it has one (MP4, MKV, raw H.264: a decoder allowed no pixel
    decodes nothing, 0.4 ms), else a first frame's, decoded within the limit (WebM, AVI: 2.5 ms). A clip
    whose size stays unknown is left to PyAV, whose decoders hold the limit.
    """
    for max_pixels in (1, None):
        try:
            with _open_video(data, max_pixels, threads="1") as container:  # one frame at most: no threads
                _video_stream(uri, container)  # a clip without one is refused here
                contexts = [v.codec_context for v in container.streams.video]
                sizes = [(c.height, c.width) if c is not None else (0, 0) for c in contexts]
        except av.FFmpegError as exc:
            raise MediaError(f"cannot decode video {uri}: {_av_reason(exc)}") from exc
        for height, width in sizes:
            check_decoded(uri, 1, height, width)
        if all(height and width for height, width in sizes):
            return True
    return False


def _decord_reader(uri: str, data: bytes) -> Any:
    """A decord reader, or None when decord is missing, cannot open the data or should not (see
    `_check_frame_size`; MediaError when the clip's frames are over the pixel limit)."""
    if decord is None or data[:4] == b"GIF8":  # decord reads no GIF: PyAV does, within the pixel limit
        return None
    if not _check_frame_size(uri, data):
        return None
    # The bridge is per thread and another library may have switched it to torch.
    decord.bridge.set_bridge("native")
    try:
        reader = decord.VideoReader(io.BytesIO(data))
    except Exception:  # decord raises RuntimeError or DECORDError; PyAV gives the clearer error later
        return None
    return reader if len(reader) else None


def _video_stream(uri: str, container: Any) -> Any:
    """The first video stream, whose decoder refuses frames over the pixel limit: a stream may grow its
    frames midway (32x32, then 9000x9000 frames took 359 MB before they were refused by their size)."""
    if not container.streams.video:
        raise MediaError(f"cannot decode video {uri}: no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise MediaError(f"cannot decode video {uri}: no decoder for its codec")
    stream.codec_context.options = {"max_pixels": str(_decoder_pixels())}
    return stream


def _av_reason(exc: Exception) -> str:
    # PyAV appends the file name, which for a buffer is just '<none>'.
    return getattr(exc, "strerror", None) or str(exc)


def _decode_pyav(
    uri: str, data: bytes, num_frames: int | None, info: VideoInfo, picked: Sequence[int] | None = None
) -> npt.NDArray[np.uint8]:
    """The picked frames only: the stream is decoded in order and every other frame is dropped, so a
    clip of 10⁵ frames read for 16 keeps 16 in memory."""
    indices = _pick(uri, info.num_frames, num_frames, picked) if info.num_frames else None
    check_decoded(uri, len(indices) if indices is not None else 1, info.height, info.width)
    wanted = set(indices) if indices is not None else None
    frames = []
    try:
        with _open_video(data) as container:
            for n, frame in enumerate(container.decode(_video_stream(uri, container))):
                if (frame.height, frame.width) != (info.height, info.width):  # a stream may change size
                    raise MediaError(
                        f"frames of {uri} differ in size: frame {n} is {frame.width}x{frame.height}, the "
                        f"stream's {info.width}x{info.height}"
                    )
                if wanted is None or n in wanted:
                    frames.append(frame.to_ndarray(format="rgb24"))
                    check_decoded(uri, len(frames), info.height, info.width)
                if indices is not None and n >= indices[-1]:
                    break
    except av.FFmpegError as exc:
        raise MediaError(f"cannot decode video {uri}: {_av_reason(exc)}") from exc
    if not frames:
        raise MediaError(f"cannot decode video {uri}: no frames")
    if wanted is not None and len(frames) < len(wanted):  # the stream ended before its header's count
        missing = sorted(wanted)[len(frames)]
        count = info.num_frames
        raise MediaError(f"cannot decode video {uri}: its header lists {count} frames; frame {missing} won't")
    if indices is None and (num_frames is not None or picked is not None):  # the container had no count
        frames = [frames[i] for i in _pick(uri, len(frames), num_frames, picked)]
    return np.stack(frames)


def _sampled(num_frames: int | None, total: int, limit: int | None) -> int | None:
    """Frames to sample: `num_frames`, else every frame (None) or, with a `limit`, at most that many."""
    return num_frames or (min(total, limit) if limit else None)


def _decord_first(reader: Any) -> tuple[npt.NDArray[np.uint8], VideoInfo]:
    """The first frame and the clip's info: decord tells a frame's size only by decoding one, and the
    frame is kept so that a read starting at frame 0 does not decode it twice."""
    first = reader.next().asnumpy()
    height, width, _ = first.shape
    return first, VideoInfo(len(reader), height, width, float(reader.get_avg_fps()))


def _decode_decord(
    uri: str, reader: Any, num_frames: int | None, picked: Sequence[int] | None, limit: int | None
) -> tuple[npt.NDArray[np.uint8], VideoInfo] | None:
    """The frames through decord, which seeks to them instead of decoding the whole clip; None when the
    stream is damaged (PyAV then decides whether anything is readable)."""
    try:
        first, info = _decord_first(reader)
    except Exception:  # decord raises RuntimeError or DECORDError
        return None
    indices = _pick(uri, info.num_frames, _sampled(num_frames, info.num_frames, limit), picked)
    check_decoded(uri, len(indices), info.height, info.width)
    head = first[None][: int(bool(indices) and indices[0] == 0)]  # frame 0, when it is wanted
    rest = indices[len(head) :]
    try:
        tail = reader.get_batch(rest).asnumpy() if rest else head[:0]
    except Exception:
        return None
    return np.concatenate([head, tail]), info


def _decode_video(
    uri: str,
    data: bytes,
    num_frames: int | None,
    picked: Sequence[int] | None = None,
    limit: int | None = None,
) -> tuple[npt.NDArray[np.uint8], VideoInfo]:
    """The sampled (or `picked`) frames and the clip's info (its frame count, size and rate), each
    decoder opened once. Without `num_frames`: every frame, or at most `limit` spread evenly."""
    reader = _decord_reader(uri, data)
    decoded = _decode_decord(uri, reader, num_frames, picked, limit) if reader is not None else None
    if decoded is not None:
        return decoded
    info = _pyav_info(uri, data)
    count = _sampled(num_frames, info.num_frames, limit)
    return _decode_pyav(uri, data, count, info, picked), info


def _fitted(frames: npt.NDArray[np.uint8], size: tuple[int, int] | None) -> npt.NDArray[np.uint8]:
    if size is None or frames.shape[1:3] == tuple(size):
        return frames
    return np.stack([fit_frame(frame, size) for frame in frames])


def read_video(
    uri: str,
    num_frames: int | None = None,
    size: tuple[int, int] | None = None,
    indices: Sequence[int] | None = None,
) -> npt.NDArray[np.uint8]:
    """(F,H,W,3) RGB frames; `num_frames` samples evenly over the clip, or `indices` names the frames;
    `size` (h, w) covers and crops."""
    return _fitted(_decode_video(uri, _read(uri, "video"), num_frames, indices)[0], size)


def read_sampled_video(
    uri: str, num_frames: int | None, max_frames: int, max_bytes: int = MAX_INPUT_BYTES
) -> tuple[npt.NDArray[np.uint8], int]:
    """`num_frames` frames spread evenly over the clip (None: every frame, at most `max_frames`, spread
    evenly), and the clip's frame count, from one fetch of the file."""
    frames, info = _decode_video(uri, _read(uri, "video", max_bytes), num_frames, limit=max_frames)
    return frames, info.num_frames


def read_video_and_rate(uri: str, size: tuple[int, int] | None = None) -> tuple[npt.NDArray[np.uint8], float]:
    """Every frame (as `read_video`) and the clip's frame rate, from one fetch of the file."""
    frames, info = _decode_video(uri, _read(uri, "video"), None)
    return _fitted(frames, size), info.fps


def video_info(uri: str) -> VideoInfo:
    """Frame count, size and rate, counted the way `read_video` counts so the two agree."""
    return _info(uri, _read(uri, "video"))


def _info(uri: str, data: bytes) -> VideoInfo:
    reader = _decord_reader(uri, data)
    if reader is not None:
        try:
            return _decord_first(reader)[1]
        except Exception:  # as in _decode_decord: let PyAV judge a stream decord stumbles on
            pass
    return _pyav_info(uri, data)


def _pyav_info(uri: str, data: bytes) -> VideoInfo:
    try:
        with _open_video(data) as container:
            stream = _video_stream(uri, container)
            # Some containers (WebM, GIF) carry no frame count; counting packets still decodes nothing.
            count = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
            rate = stream.average_rate or stream.guessed_rate
            context = stream.codec_context
            height, width = context.height, context.width
    except av.FFmpegError as exc:
        raise MediaError(f"cannot decode video {uri}: {_av_reason(exc)}") from exc
    if not height or not width:  # the probe could not decode a first frame
        raise MediaError(
            f"cannot decode video {uri}: its first frame does not decode (damaged, or over the "
            f"{MAX_IMAGE_PIXELS:,}-pixel limit)"
        )
    return VideoInfo(count, height, width, float(rate) if rate else 0.0)


def _mp4_codec() -> str:
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def _encode_mp4(frames: npt.NDArray[np.uint8], fps: float) -> bytes:
    """H.264 (or MPEG-4 Part 2 where the PyAV build lacks x264) in yuv420p, which every player reads.

    yuv420p needs even sides, so an odd height or width gets one more row or column copied from the
    edge; the video read back is then that pixel larger.
    """
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    codec = _mp4_codec()
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": _X264_CRF}
        else:
            # The mpeg4 default of 200 kb/s smears anything but thumbnails.
            stream.bit_rate = max(2_000_000, int(frames.shape[1] * frames.shape[2] * fps * 0.3))
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def _encode_gif(frames: npt.NDArray[np.uint8], fps: float) -> bytes:
    """A looping GIF; each frame replaces the last instead of drawing over it.

    GIF delays are whole centiseconds, and Pillow merges identical consecutive frames into one longer
    frame, so a clip with repeats reads back with fewer frames (timing is kept).
    """
    images = [Image.fromarray(frame) for frame in frames]
    buffer = io.BytesIO()
    images[0].save(
        buffer, format="GIF", save_all=True, append_images=images[1:], duration=1000 / fps, loop=0, disposal=2
    )
    return buffer.getvalue()


_VIDEO_ENCODERS: dict[str, Callable[[npt.NDArray[np.uint8], float], bytes]] = {
    ".mp4": _encode_mp4,
    ".gif": _encode_gif,
}


def write_video(frames: npt.NDArray[np.uint8], uri: str, fps: float = 8.0) -> str:
    """Encode (F,H,W,3) uint8 frames in the format the extension names (.mp4 or .gif)."""
    encode = _VIDEO_ENCODERS.get(posixpath.splitext(uri)[1].lower())
    if encode is None:
        raise ValueError(f"cannot write video {uri}: extension must be one of {sorted(_VIDEO_ENCODERS)}")
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 or not len(frames):
        raise ValueError(f"expected uint8 frames of shape (F,H,W,3), got {frames.dtype} {frames.shape}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return write_bytes(encode(frames, fps), uri)


# -- masks ----------------------------------------------------------------------------------------


def _mask_frames(uri: str, select: Callable[[int], Sequence[int]] | None) -> npt.NDArray[np.uint8]:
    """The mask's frames that `select` picks given their count (every frame without it), decoding only
    those: a long mask video or animation is never decoded whole for the few frames a row uses."""
    wanted: list[int] = []

    def unique(count: int) -> list[int]:
        wanted[:] = [int(i) for i in (select(count) if select else range(count))]
        if any(not 0 <= i < count for i in wanted):
            raise MediaError(f"mask {uri} has {count} frames; frames {sorted(set(wanted))} were asked for")
        return sorted(set(wanted))

    _refuse_url_chain(uri, "mask")  # before the chain is opened
    fs, path = _input_filesystem(uri, "mask")
    if fs.isdir(path):
        names = sorted(
            name
            for name in (posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
            if name.lower().endswith(".png") and not name.startswith(".")
        )
        if not names:
            raise MediaError(f"mask folder has no PNG frames: {uri}")
        picked = unique(len(names))
        frames = _stack(uri, (_read_still(join(uri, names[i]), "mask frame") for i in picked), len(picked))
    else:
        data = _read(uri, "mask")
        # Still and animated images go through PIL, everything else through the video decoders.
        images = _decode_images(uri, data, "mask", unique)
        if images is None:
            images = _decode_video(uri, data, None, picked=unique(_info(uri, data).num_frames))[0]
        frames, picked = images, sorted(set(wanted))
    return frames[np.searchsorted(picked, wanted)]


def read_mask(
    uri: str, size: tuple[int, int] | None = None, select: Callable[[int], Sequence[int]] | None = None
) -> npt.NDArray[np.bool_]:
    """(F,H,W) bool from a mask video, one image (F=1) or a folder of PNG frames in name order.

    `select` maps the mask's frame count to the frames wanted, in order and possibly repeated (it
    raises when the count does not fit the row); only those are decoded. Pixels count as inside when
    their luminance is above 127. `size` (h, w) resizes with nearest neighbour, which keeps values
    binary, and never crops, so no masked area is cut away.
    """
    masks = np.stack([frame @ _LUMA > 127 for frame in _mask_frames(uri, select)])  # float per frame only
    if size is not None and masks.shape[1:] != tuple(size):
        (h, w), (old_h, old_w) = size, masks.shape[1:]
        rows = ((np.arange(h) + 0.5) * old_h / h).astype(np.int64)
        cols = ((np.arange(w) + 0.5) * old_w / w).astype(np.int64)
        masks = masks[:, rows[:, None], cols]
    return masks


def fit_masks(masks: npt.NDArray[np.bool_], size: tuple[int, int]) -> npt.NDArray[np.bool_]:
    """Masks (F,H,W) scaled to cover `size` (h, w) and centre-cropped, as `read_video(size=...)` does
    to frames (ImageOps.fit), so a mask stays aligned with the video it was drawn on; nearest neighbour."""
    (h, w), (old_h, old_w) = size, masks.shape[1:]
    crop_w, crop_h = min(old_w, old_h * w / h), min(old_h, old_w * h / w)
    x0, y0 = (old_w - crop_w) / 2, (old_h - crop_h) / 2
    rows = np.clip((y0 + (np.arange(h) + 0.5) * crop_h / h).astype(np.int64), 0, old_h - 1)
    cols = np.clip((x0 + (np.arange(w) + 0.5) * crop_w / w).astype(np.int64), 0, old_w - 1)
    return masks[:, rows[:, None], cols]


# -- SVG ------------------------------------------------------------------------------------------


def read_svg(uri: str) -> str:
    """The document's text, after checking it is SVG, so renderers fail here with a clear message."""
    data = _read(uri, "SVG", MAX_SVG_BYTES)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:  # UTF-16 and UTF-32 documents decode "validly", with NULs
        raise MediaError(f"not an SVG document: {uri} (not UTF-8 text)")
    svg_root(data, uri)
    return text


def svg_root(data: bytes, source: str) -> ElementTree.Element:
    """The root element of an SVG document; MediaError naming `source` when the bytes are not one.

    defusedxml refuses entity declarations as the XML parser meets them, in whatever encoding the parser
    detects, before any is expanded.
    """
    try:
        root = DefusedElementTree.fromstring(data)
    except defusedxml.DefusedXmlException:
        raise MediaError(f"not accepted as SVG: {source} declares XML entities (an entity bomb?)") from None
    except ElementTree.ParseError as exc:
        raise MediaError(f"not an SVG document: {source} (invalid XML: {exc})") from exc
    if root.tag not in ("svg", f"{{{SVG_NAMESPACE}}}svg"):
        raise MediaError(f"not an SVG document: {source} (root element is {root.tag!r})")
    elements = _expanded_elements(root)
    if elements is None:
        raise MediaError(f"not accepted as SVG: {source} has a <use> of an element that holds it (a cycle)")
    if elements > MAX_SVG_ELEMENTS:
        raise MediaError(
            f"not accepted as SVG: {source} has over {MAX_SVG_ELEMENTS:,} elements, counting the copies its "
            "<use> references make (a reference bomb?)"
        )
    return root


_XLINK_HREF = "{http://www.w3.org/1999/xlink}href"


def _expanded_elements(root: ElementTree.Element) -> int | None:
    """How many elements the document has with every <use> replaced by a copy of what it refers to, as
    renderers (svgelements) draw it (over `MAX_SVG_ELEMENTS` counts as `MAX_SVG_ELEMENTS + 1`); None for
    a reference cycle. Iterative: nesting depth is the document's choice."""
    named = {element.get("id"): element for element in root.iter() if element.get("id")}

    def parts(element: ElementTree.Element) -> list[ElementTree.Element]:
        href = element.get("href") or element.get(_XLINK_HREF) or ""
        used = named.get(href[1:]) if element.tag.rpartition("}")[2] == "use" and href[:1] == "#" else None
        return [*element, *([used] if used is not None else [])]

    past = MAX_SVG_ELEMENTS + 1
    sizes: dict[int, int] = {}
    open_: set[int] = set()  # elements whose parts are being counted: the path from the root
    todo: list[tuple[ElementTree.Element, bool]] = [(root, False)]
    while todo:
        element, counted = todo.pop()
        if id(element) in sizes:
            continue
        if counted:
            sizes[id(element)] = min(past, 1 + sum(sizes[id(part)] for part in parts(element)))
            open_.discard(id(element))
            continue
        open_.add(id(element))
        todo.append((element, True))
        for part in parts(element):
            if id(part) in open_:
                return None  # a <use> of an element that holds it
            if id(part) not in sizes:
                todo.append((part, False))
    return sizes[id(root)]


# What `shapes_only_svg` keeps: shapes, their geometry and paint, and SMIL animation of those (how
# LiveSketch's animated SVG loops). Everything else goes: scripts, event handlers, links, foreignObject,
# CSS, and references to other documents.
_SVG_SHAPES = {"svg", "g", "path", "line", "polyline", "polygon", "rect", "circle", "ellipse"}
_SVG_PAINT = {
    "fill", "fill-opacity", "fill-rule", "stroke", "stroke-opacity", "stroke-width", "stroke-linecap",
    "stroke-linejoin", "stroke-miterlimit", "stroke-dasharray", "stroke-dashoffset", "opacity",
}  # fmt: skip
_SVG_GEOMETRY = {"d", "points", "transform", "x", "y", "x1", "y1", "x2", "y2", "cx", "cy", "r", "rx", "ry"}
_SVG_ATTRIBUTES = _SVG_PAINT | _SVG_GEOMETRY | {"width", "height", "viewBox", "preserveAspectRatio"}
_SVG_ANIMATION = {"attributeName", "values", "from", "to", "dur", "begin", "repeatCount", "calcMode"}
# Values of numbers, names, colours and path data only: no backslash (a CSS escape makes `u\rl(` a URL to
# a browser), quote, slash, `<` or `&`.
_SVG_PLAIN_VALUE = re.compile(r"[\w\s#.,;:%()+-]*", re.ASCII)
_SVG_MAX_DEPTH = 256


def shapes_only_svg(text: str) -> str:
    """An SVG (checked by `read_svg`) rebuilt from its shapes alone, for showing a document someone else
    wrote as a file of our own: a browser runs the scripts of an SVG opened by itself, and no list of
    what is dangerous in SVG stays complete, so this keeps a short list of what is not."""

    def kept(element: ElementTree.Element) -> ElementTree.Element | None:
        namespace, _, tag = element.tag.rpartition("}")
        if namespace not in ("", f"{{{SVG_NAMESPACE}"):
            return None
        names = _SVG_ATTRIBUTES | (_SVG_ANIMATION if tag == "animate" else set())
        attributes = {
            k: v
            for k, v in element.attrib.items()
            if k in names and _SVG_PLAIN_VALUE.fullmatch(v) and "url(" not in v.lower()
        }
        animated = attributes.get("attributeName")
        if tag not in _SVG_SHAPES and not (tag == "animate" and animated in _SVG_PAINT | _SVG_GEOMETRY):
            return None
        return ElementTree.Element(tag, attributes)

    try:
        source = DefusedElementTree.fromstring(text)
    except ElementTree.ParseError as exc:  # read_svg parsed the bytes, in the encoding they declare
        raise MediaError(f"not an SVG document (invalid XML as text: {exc})") from exc
    root = kept(source)
    if root is None or root.tag != "svg":
        raise MediaError("not an SVG document (root element is not svg)")
    todo = [(source, root, 1)]  # a loop, not recursion: nesting depth is the document's choice
    while todo:
        element, out, depth = todo.pop()
        if depth > _SVG_MAX_DEPTH:
            raise MediaError(f"not shown: SVG elements nested more than {_SVG_MAX_DEPTH} deep")
        for child in element:
            rebuilt = kept(child)
            if rebuilt is not None:
                out.append(rebuilt)
                todo.append((child, rebuilt, depth + 1))
    root.set("xmlns", SVG_NAMESPACE)
    return ElementTree.tostring(root, encoding="unicode") + "\n"


def pack_arrays(arrays: dict[str, npt.NDArray[Any]]) -> bytes:
    """Arrays as one uncompressed .npz: how decoded inputs travel between Ray stages as a binary cell."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def unpack_arrays(data: bytes) -> dict[str, npt.NDArray[Any]]:
    """The inverse of `pack_arrays`; object arrays are refused, so reading never unpickles."""
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}

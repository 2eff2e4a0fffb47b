"""A real headless browser for tests: Debian's Chromium (``apt-get install chromium``), driven from its command line.

``dump_dom`` returns the DOM after the page loaded (what a person's browser would build from the HTML and CSS);
``screenshot`` writes a PNG of the viewport. Every call starts a fresh Chromium with its own throwaway profile, as
root-safe as Chromium allows (``--no-sandbox``), with no network of its own (no updates, sync, QUIC or first-run
pages). ``png_facts`` decodes a PNG with zlib alone (no Pillow needed) to check that a screenshot is not blank.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
]
WINDOW = (1280, 900)


def available() -> bool:
    return Path(CHROMIUM).exists()


def _chromium(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        command = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}", *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={"HOME": profile, "PATH": "/usr/bin:/bin"})
    if done.returncode != 0:
        raise AssertionError(f"chromium exited {done.returncode}: {done.stderr[-2000:]}")
    return done


def dump_dom(url: str, timeout: float = 60.0) -> str:
    """The serialised DOM of ``url`` once loaded."""
    return _chromium(["--virtual-time-budget=2000", "--dump-dom", url], timeout).stdout


def screenshot(url: str, path: Path, timeout: float = 60.0) -> Path:
    """A PNG of the viewport (``WINDOW``) showing ``url``."""
    _chromium([f"--screenshot={path}", url], timeout)
    if not path.exists():
        raise AssertionError(f"chromium wrote no screenshot at {path}")
    return path


@dataclass(frozen=True)
class PngFacts:
    width: int
    height: int
    non_white: int  # pixels that are not (near) white
    colours: int  # distinct colours (capped at 4096)

    @property
    def pixels(self) -> int:
        return self.width * self.height


def png_facts(path: Path) -> PngFacts:
    """Size, non-white pixels and distinct colours of an 8-bit RGB or RGBA PNG, decoded with zlib."""
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise AssertionError(f"{path} is not a PNG")
    offset, idat = 8, b""
    width = height = depth = colour_type = interlace = 0
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        chunk = data[offset + 8 : offset + 8 + length]
        offset += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour_type, _compression, _filter, interlace = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        elif kind == b"IEND":
            break
    channels = {2: 3, 6: 4}.get(colour_type)
    if depth != 8 or channels is None or interlace:
        raise AssertionError(f"{path}: unsupported PNG (bit depth {depth}, colour type {colour_type}, interlace {interlace})")
    raw = zlib.decompress(idat)
    stride = width * channels
    previous = bytearray(stride)
    non_white = 0
    colours: set[bytes] = set()
    for row in range(height):
        start = row * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            upper_left = previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + ((left + up) >> 1)) & 0xFF
            elif kind == 4:
                p = left + up - upper_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - upper_left)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else upper_left)) & 0xFF
        for x in range(0, stride, channels):
            pixel = bytes(line[x : x + 3])
            if min(pixel) < 240:
                non_white += 1
            if len(colours) < 4096:
                colours.add(pixel)
        previous = line
    return PngFacts(width, height, non_white, len(colours))

"""cura.atomic: the old content or the whole new one, never a part; no temporaries left; no fixed names."""

from __future__ import annotations

import json
import os
import stat

import pytest

from cura.atomic import atomic_file, atomic_folder, replace_folder, write_bytes, write_json, write_text


def _entries(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_text_bytes_json(tmp_path):
    assert write_text(tmp_path / "a.txt", "héllo") == tmp_path / "a.txt"
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo"
    write_bytes(tmp_path / "b.bin", b"\x00\xff")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    write_json(tmp_path / "c.json", {"x": [1, 2], "ü": None})
    assert (tmp_path / "c.json").read_text(encoding="utf-8").endswith("\n")
    assert json.loads((tmp_path / "c.json").read_text(encoding="utf-8")) == {"x": [1, 2], "ü": None}
    write_text(tmp_path / "a.txt", "second")  # replaces
    assert (tmp_path / "a.txt").read_text() == "second"
    assert _entries(tmp_path) == ["a.txt", "b.bin", "c.json"]


def test_new_files_get_ordinary_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        write_text(tmp_path / "f", "x")
        with atomic_folder(tmp_path / "d") as tmp:
            (tmp / "g").write_text("y")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o644  # mkstemp alone would give 0o600
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755  # mkdtemp alone would give 0o700


def test_exception_mid_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    write_json(path, {"old": True})
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_file(path) as tmp:
            tmp.write_text('{"new": tr')  # half written
            raise RuntimeError("disk on fire")
    assert json.loads(path.read_text()) == {"old": True}
    assert _entries(tmp_path) == ["summary.json"]


def test_unserializable_json_touches_nothing(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, [1])
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == [1]
    assert _entries(tmp_path) == ["x.json"]


def test_temporary_keeps_the_suffix_and_lives_beside_the_destination(tmp_path):
    with atomic_file(tmp_path / "plot.png") as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp.name.startswith(".plot.png.")
        tmp.write_bytes(b"png")
    assert (tmp_path / "plot.png").read_bytes() == b"png"


def test_folder_replace_and_exception_keeps_the_old_folder(tmp_path):
    folder = tmp_path / "adapter"
    with atomic_folder(folder) as tmp:
        (tmp / "weights").write_text("v1")
    assert _entries(folder) == ["weights"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(folder) as tmp:
            (tmp / "weights").write_text("v2-partial")
            raise KeyboardInterrupt  # Ctrl-C mid-save
    assert (folder / "weights").read_text() == "v1"
    assert _entries(tmp_path) == ["adapter"]
    with atomic_folder(folder) as tmp:
        (tmp / "weights").write_text("v2")
        (tmp / "config").write_text("c")
    assert _entries(folder) == ["config", "weights"] and (folder / "weights").read_text() == "v2"
    assert _entries(tmp_path) == ["adapter"]  # the old folder is gone too


def test_stale_fixed_names_from_an_old_crash_do_not_break_a_save(tmp_path):
    """The previous saver renamed to `.adapter.tmp` / `.adapter.old`; a crash left them behind."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "weights").write_text("v1")
    for stale in (".adapter.old", ".adapter.tmp"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "junk").write_text("left by a crash")
    (tmp_path / ".adapter.json.tmp").write_text("junk")
    for version in ("v2", "v3"):
        with atomic_folder(folder) as tmp:
            (tmp / "weights").write_text(version)
        write_text(tmp_path / "adapter.json", version)
    assert (folder / "weights").read_text() == "v3" and (tmp_path / "adapter.json").read_text() == "v3"
    assert _entries(tmp_path) == [
        ".adapter.json.tmp",
        ".adapter.old",
        ".adapter.tmp",
        "adapter",
        "adapter.json",
    ]


def test_no_overwrite_refuses_and_cleans_up(tmp_path):
    folder = tmp_path / "out"
    with atomic_folder(folder, overwrite=False) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(FileExistsError):
        with atomic_folder(folder, overwrite=False) as tmp:
            (tmp / "a").write_text("2")
    assert (folder / "a").read_text() == "1" and _entries(tmp_path) == ["out"]


def test_replace_folder_swaps_in_one_rename(tmp_path):
    """Where the kernel can exchange two names (Linux renameat2), a re-save is one step: no moment without
    a complete folder, no graveyard."""
    import cura.atomic as atomic

    folder, new = tmp_path / "ckpt", tmp_path / "new"
    for path, text in ((folder, "old"), (new, "new")):
        path.mkdir()
        (path / "a").write_text(text)
    if not atomic._exchange(new, folder):
        pytest.skip("this file system or kernel cannot exchange names (renameat2 RENAME_EXCHANGE)")
    assert (folder / "a").read_text() == "new" and (new / "a").read_text() == "old"  # swapped
    (new / "a").write_text("newer")
    replace_folder(new, folder)
    assert (folder / "a").read_text() == "newer" and _entries(tmp_path) == ["ckpt"]


def test_replace_folder_puts_the_old_one_back_when_the_swap_fails(tmp_path, monkeypatch):
    """The two-rename fallback (no renameat2): a failed second rename puts the old folder back."""
    import cura.atomic as atomic

    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    folder, new = tmp_path / "ckpt", tmp_path / "new"
    folder.mkdir()
    (folder / "a").write_text("old")
    new.mkdir()
    (new / "a").write_text("new")
    real_replace = os.replace

    def failing(src, dst):
        if str(src) == str(new):
            raise OSError("no space left")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="no space"):
        replace_folder(new, folder)
    monkeypatch.undo()

    assert (folder / "a").read_text() == "old"
    assert _entries(tmp_path) == ["ckpt", "new"]  # no graveyard left


def test_os_error_in_reads_a_writers_hidden_errno_and_never_guesses(tmp_path):
    """safetensors' Rust message carries the errno; numpy's short write has none, so it counts as a full disk
    only when the file system really has less room than was asked for."""
    import errno

    from cura.atomic import os_error_in

    hidden = os_error_in(RuntimeError("Error while serializing: No space left on device (os error 28)"), "x")
    assert hidden.errno == errno.ENOSPC and hidden.filename == "x"
    assert os_error_in(RuntimeError("shapes do not match"), "x") is None
    assert os_error_in(OSError(errno.ENOSPC, "No space left on device"), "x") is None  # already an OSError
    short = OSError("8192 requested and 136 written")
    assert os_error_in(short, tmp_path / "f.gguf") is None  # this disk has far more than 8 KiB free
    assert (
        os_error_in(OSError(f"{1 << 62} requested and 136 written"), tmp_path / "f.gguf").errno
        == errno.ENOSPC
    )

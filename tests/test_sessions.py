"""The session store keeps a shared disk in bounds: quotas, the shared spec cache, sweeping leftovers, and a full disk
that keeps the earlier files and leaves no descriptor open. Fast, offline, no Gradio."""

from __future__ import annotations

import errno
import os
import sys
import time
from pathlib import Path

import pytest

from core import sessions
from core.runtime import files
from core.runtime.errors import DISK_FULL, NAME_TOO_LONG, os_error_message
from tests.helpers import colour_zip

OLD = time.time() - 3600  # older than any stale age used here
linux_fds = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")


def _fd_targets() -> set[str]:
    """What this process's open descriptors point at."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return out


def _deleted_fds() -> set[str]:
    return {t for t in _fd_targets() if t.endswith("(deleted)")}


def _blob(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


def _age(*paths: Path, when: float = OLD) -> None:
    """Set the mtime of ``paths`` (pass files before their folders: creating a file touches its folder)."""
    for p in paths:
        os.utime(p, (when, when))


def _spec(seed: int) -> str:
    return f"sample:shapes?per_class=4&size=32&seed={seed}"


# ------------------------------------------------------------------------------------------------ quotas


def test_per_session_quota_refuses_with_a_storage_limit_message(tmp_path):
    store = sessions.SessionStore(tmp_path, session_quota_bytes=10_000, global_quota_bytes=10**9)
    state = sessions.new_state()
    _blob(store.folder(state) / "data" / "upload-1" / "a.png", 8_000)
    store.reserve(state, 1_000)  # fits
    with pytest.raises(sessions.SessionError) as err:
        store.reserve(state, 5_000)
    assert err.value.title == sessions.STORAGE_LIMIT
    assert "This session uses 8.8 KB of its 9.8 KB of storage" in str(err.value)  # 8000 + the 1000 reserved
    assert "smaller dataset" in str(err.value) and str(tmp_path) not in str(err.value)
    with pytest.raises(sessions.SessionError, match="more than the 9.8 KB a session may store"):
        store.reserve(sessions.new_state(), 20_000)


def test_over_its_quota_a_session_loses_its_older_runs_first_not_the_current_one(tmp_path):
    store = sessions.SessionStore(tmp_path, session_quota_bytes=10_000, global_quota_bytes=10**9)
    state = sessions.new_state()
    runs = store.folder(state) / "runs"
    older, current = runs / "run-1", runs / "run-2"
    _blob(older / "model.onnx", 6_000)
    _blob(current / "model.onnx", 2_000)
    state["run_dir"] = str(current)
    store.reserve(state, 5_000)
    assert not older.exists() and current.is_dir()
    with pytest.raises(sessions.SessionError, match="its older runs were removed already"):
        _blob(older / "model.onnx", 6_000)
        store.reserve(state, 20_000 - 10_001)  # needs more than deleting run-1 frees


def test_a_zip_too_big_for_the_quota_is_refused_before_anything_is_written(tmp_path):
    store = sessions.SessionStore(tmp_path / "root", session_quota_bytes=5_000, global_quota_bytes=10**9)
    state = store.ensure_state(None)
    zip_path = colour_zip(tmp_path / "colours.zip")
    assert zip_path.stat().st_size > 5_000
    with pytest.raises(sessions.SessionError, match="Storage limit|more than the"):
        store.load_zip(state, zip_path, "colours.zip")
    assert not (store.folder(state) / "data").exists()


def test_global_quota_evicts_the_oldest_idle_session_first_never_a_busy_one(tmp_path):
    store = sessions.SessionStore(tmp_path, global_quota_bytes=40_000, session_quota_bytes=10**9)
    busy_oldest, idle_old, idle_new, me = (sessions.new_state() for _ in range(4))
    for i, state in enumerate((busy_oldest, idle_old, idle_new, me)):
        folder = store.folder(state)
        _age(_blob(folder / "data" / "a.png", 10_000), folder / "data", folder, when=OLD + i)
    with store.busy(busy_oldest["sid"]):
        store.reserve(me, 5_000)  # 40 KB + 5 KB: one idle session must go, the least recently used
        assert [store.folder(s, create=False).is_dir() for s in (busy_oldest, idle_old, idle_new, me)] == \
               [True, False, True, True]
        # not enough room even after evicting every idle session: refused, and nobody is evicted for nothing
        with pytest.raises(sessions.SessionError, match="storage for all visitors is full") as err:
            store.reserve(me, 25_000)
        assert err.value.title == sessions.STORAGE_LIMIT
        assert store.folder(idle_new, create=False).is_dir() and store.folder(busy_oldest, create=False).is_dir()
        store.reserve(me, 12_000)  # 10+10+15 KB (5 reserved) + 12 KB: room once idle_new goes; the busy one stays
        assert not store.folder(idle_new, create=False).exists()
        assert store.folder(busy_oldest, create=False).is_dir()
    assert not list(tmp_path.glob(".staging-*"))  # evicted folders are gone, not parked


def test_usage_is_measured_for_display(tmp_path):
    store = sessions.SessionStore(tmp_path, session_quota_bytes=1024**3, global_quota_bytes=20 * 1024**3)
    state = sessions.new_state()
    _blob(store.folder(state) / "data" / "a.png", 3 * 1024**2)
    usage = store.usage(state)
    assert usage["session_bytes"] == usage["total_bytes"] == 3 * 1024**2
    assert store.usage_text(state) == "Storage: this session 3 MB of 1 GB; all visitors 3 MB of 20 GB"


def test_the_default_global_quota_is_a_share_of_the_free_disk_at_most_20_gb(tmp_path):
    quota = sessions.SessionStore(tmp_path).global_quota_bytes
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    assert 0 < quota <= min(sessions.GLOBAL_QUOTA_MAX_BYTES, free)


# ------------------------------------------------------------------------------------------------ spec samples


def test_spec_samples_land_in_the_shared_cache_which_stays_under_its_cap(tmp_path):
    cap = 100_000  # about three tiny samples
    store = sessions.SessionStore(tmp_path, spec_cache_bytes=cap, spec_generations_per_hour=100)
    a, b = sessions.new_state(), sessions.new_state()
    for seed in range(8):
        for state in (a, b):
            _, ds = store.load_sample(state, _spec(seed))
            assert ds.root.is_relative_to(store.spec_cache)
            assert store.spec_cache_bytes_used() <= cap
    assert len(store._spec_entries()) <= 3
    for state in (a, b):  # nothing per session, and what both loaded last is still there
        assert not (store.folder(state) / "cache").exists()
    assert ds.root.is_dir() and all(p.is_file() for p in ds.root.rglob("*.png"))
    # a session's current sample is never trimmed away under it, even by a stranger's seeds
    _, mine = store.load_sample(a, _spec(100))
    for seed in range(101, 106):
        store.load_sample(b, _spec(seed))
    assert mine.root.is_dir() and store.spec_cache_bytes_used() <= cap


def test_a_session_may_generate_only_so_many_new_samples_per_hour(tmp_path):
    store = sessions.SessionStore(tmp_path, spec_generations_per_hour=2)
    state = sessions.new_state()
    store.load_sample(state, _spec(1))
    store.load_sample(state, _spec(2))
    with pytest.raises(sessions.SessionError, match="2 new samples in the last hour") as err:
        store.load_sample(state, _spec(3))
    assert err.value.title == "Too many samples"
    store.load_sample(state, _spec(1))  # one it generated before: no new work
    store.load_sample(sessions.new_state(), _spec(3))  # another session's allowance is its own


# ------------------------------------------------------------------------------------------------ sweeping


def test_sweep_removes_old_partial_folders_in_shared_and_sessions_but_keeps_fresh_ones(tmp_path):
    store = sessions.SessionStore(tmp_path)
    state, busy = sessions.new_state(), sessions.new_state()
    mine, theirs = store.folder(state), store.folder(busy)
    shared_old = tmp_path / "_shared" / "samples" / ".shapes-abc.partial-x1y2z3"
    run_old = mine / "runs" / "run-1" / ".staging-k2j4l5"
    file_old = mine / "uploaded" / ".m.onnx.0123456789ab.tmp"
    busy_old = theirs / "runs" / "run-1" / ".staging-b7c8d9"
    user_file = mine / "data" / "upload-1" / "files" / "cats" / "x.partial-1.png"  # a visitor's name: not ours
    shared_fresh = tmp_path / "_shared" / "specs" / ".shapes-def.partial-fresh1"
    for folder in (shared_old, run_old, busy_old, shared_fresh):
        _blob(folder / "a.png", 10)
    _age(shared_old / "a.png", shared_old, run_old / "a.png", run_old, busy_old / "a.png", busy_old)
    _age(_blob(file_old, 10), _blob(user_file, 10))
    fresh_inside = tmp_path / "_shared" / "samples" / ".shapes-ghi.partial-young1"  # old folder, new file inside
    _blob(fresh_inside / "train" / "a.png", 10)
    _age(fresh_inside)
    with store.busy(busy["sid"]):
        removed = store.sweep_stale(max_age_s=600)
    assert set(removed) == {shared_old, run_old, file_old}
    assert not shared_old.exists() and not run_old.exists() and not file_old.exists()
    assert shared_fresh.is_dir() and fresh_inside.is_dir() and busy_old.is_dir() and user_file.is_file()
    assert store.sweep_stale(max_age_s=600) == [busy_old]  # its job is over


def test_every_temp_name_the_code_writes_is_recognised():
    assert files.is_temp_name(files.temp_path(Path("/x/model.int8.onnx")).name)
    for name in (".shapes-3f2a9c1b7d04.partial-k2_j4x9z", ".files.partial-abc", ".staging-q8v_1x", ".triton-3kd9"):
        assert files.is_temp_name(name), name
    for name in ("model.onnx", "x.partial-1.png", "upload-abc", ".closed", ".complete", "report.json.tmp"):
        assert not files.is_temp_name(name), name


def test_housekeeping_sweeps_at_start_up_and_then_on_a_timer(tmp_path):
    store = sessions.SessionStore(tmp_path)
    first = tmp_path / "_shared" / ".digits-1.partial-aaaa"
    _age(_blob(first / "a.png", 10), first)
    thread = store.start_housekeeping(interval_s=0.05, stale_age_s=600)
    try:
        assert not first.exists()  # swept before start_housekeeping returned
        assert thread.daemon and store.start_housekeeping(interval_s=0.05) is thread
        later = store.folder(sessions.new_state()) / ".staging-bbbb"
        _age(_blob(later / "a.png", 10), later)
        deadline = time.monotonic() + 5
        while later.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not later.exists()
    finally:
        store.stop_housekeeping()
    assert not thread.is_alive()


# ------------------------------------------------------------------------------------------------ a full disk


def _leaky_write_then_enospc(dst: Path) -> None:
    """Like a writer that fills the disk: the file is open (in this frame) when the error is raised."""
    f = open(dst, "wb")  # noqa: SIM115 - left open on purpose, as torch.save's writer is
    f.write(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device", str(dst))


@linux_fds
def test_enospc_in_store_model_keeps_the_earlier_model_and_no_open_descriptor(tmp_path, monkeypatch):
    monkeypatch.setattr(sessions, "check_model_file", lambda path: {"ok": True, "classes": ["a", "b"]})
    store = sessions.SessionStore(tmp_path / "root")
    state = sessions.new_state()
    (tmp_path / "first.onnx").write_bytes(b"first model")
    store.store_model(state, tmp_path / "first.onnx", "first.onnx")
    earlier = Path(state["uploaded_model"])
    before = _deleted_fds()
    (tmp_path / "second.onnx").write_bytes(b"second model")
    monkeypatch.setattr(sessions.shutil, "copyfile", lambda src, dst: _leaky_write_then_enospc(Path(dst)))
    with pytest.raises(OSError) as err:
        store.store_model(state, tmp_path / "second.onnx", "second.onnx")
    assert err.value.errno == errno.ENOSPC
    assert _deleted_fds() == before  # checked while the exception (and its traceback) is still alive
    assert state["uploaded_model"] == str(earlier) and earlier.read_bytes() == b"first model"
    folder = store.folder(state)
    assert sorted(p.name for p in folder.iterdir()) == ["uploaded"]  # no staging folder left
    assert os_error_message(err.value) == DISK_FULL


def test_an_unusable_model_keeps_the_earlier_one(tmp_path, monkeypatch):
    verdicts = iter([{"ok": True, "classes": ["a", "b"]}, {"ok": False, "error": "not an ONNX file"}])
    monkeypatch.setattr(sessions, "check_model_file", lambda path: next(verdicts))
    store = sessions.SessionStore(tmp_path / "root")
    state = sessions.new_state()
    for name in ("first.onnx", "second.onnx"):
        (tmp_path / name).write_bytes(name.encode())
    store.store_model(state, tmp_path / "first.onnx", "first.onnx")
    with pytest.raises(sessions.SessionError, match="second.onnx is not a usable model: not an ONNX file"):
        store.store_model(state, tmp_path / "second.onnx", "second.onnx")
    assert Path(state["uploaded_model"]).read_bytes() == b"first.onnx"
    assert [p.name for p in store.folder(state).iterdir()] == ["uploaded"]


@linux_fds
def test_enospc_while_unpacking_a_zip_keeps_the_earlier_dataset(tmp_path, monkeypatch):
    store = sessions.SessionStore(tmp_path / "root")
    state = store.ensure_state(None)
    first = store.load_zip(state, colour_zip(tmp_path / "first.zip"), "first.zip")
    data = store.folder(state) / "data"
    kept = sorted(data.iterdir())
    before = _deleted_fds()

    def full_disk(zip_path, dest, **_):
        Path(dest).mkdir(parents=True)
        _leaky_write_then_enospc(Path(dest) / "a.png")

    monkeypatch.setattr(sessions, "safe_extract", full_disk)
    with pytest.raises(OSError) as err:
        store.load_zip(state, colour_zip(tmp_path / "second.zip", seed=1), "second.zip")
    assert err.value.errno == errno.ENOSPC and _deleted_fds() == before
    assert sorted(data.iterdir()) == kept and all(Path(it.path).is_file() for it in first.items)


@linux_fds
@pytest.mark.parametrize("fails", ["writing", "moving"])
def test_enospc_in_atomic_write_keeps_the_earlier_file_and_no_open_descriptor(tmp_path, monkeypatch, fails):
    target = tmp_path / "report.json"
    target.write_text("earlier")
    before = _deleted_fds()

    def produce(tmp: Path) -> None:
        if fails == "writing":
            _leaky_write_then_enospc(tmp)
        tmp.write_text("new")

    def replace_on_a_full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    with monkeypatch.context() as m:
        if fails == "moving":
            m.setattr(files.os, "replace", replace_on_a_full_disk)
        with pytest.raises(OSError) as err:
            files.atomic_write(target, produce)
    assert err.value.errno == errno.ENOSPC
    assert _deleted_fds() == before
    assert target.read_text() == "earlier"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temp file left


@linux_fds
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_real_torch_save_on_a_full_device_reads_as_disk_full_and_is_closed(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    target = tmp_path / "model.pt"
    target.write_bytes(b"earlier")
    full = tmp_path / ".model.pt.0123456789ab.tmp"
    full.symlink_to("/dev/full")  # every write there fails with ENOSPC, as on a full disk
    monkeypatch.setattr(files, "temp_path", lambda path: full)
    with pytest.raises(RuntimeError) as err:
        files.atomic_write(target, lambda tmp: torch.save({"w": torch.zeros(100_000)}, tmp))
    assert "/dev/full" not in _fd_targets()  # torch's writer was closed although the traceback lives
    assert os_error_message(err.value) == DISK_FULL
    assert target.read_bytes() == b"earlier" and not full.is_symlink()


# ------------------------------------------------------------------------------------------------ messages


def _raised(make):
    try:
        make()
    except BaseException as exc:  # noqa: BLE001
        return exc
    raise AssertionError("nothing raised")


def _wrapped_enospc():
    try:
        raise OSError(errno.ENOSPC, "No space left on device", "/srv/secret/model.pt")
    except OSError as exc:
        raise RuntimeError("export failed") from exc


def _torch_style():
    try:
        raise RuntimeError("basic_ios::clear: iostream error")
    except RuntimeError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None


@pytest.mark.parametrize(("exc", "expected"), [
    (OSError(errno.ENOSPC, "No space left on device", "/srv/secret/x"), DISK_FULL),
    (OSError(errno.EDQUOT, "Disk quota exceeded", "/srv/secret/x"), DISK_FULL),
    (OSError(errno.ENAMETOOLONG, "File name too long", "/srv/secret/" + "x" * 300), NAME_TOO_LONG),
    (_raised(_wrapped_enospc), DISK_FULL),
    (_raised(_torch_style), DISK_FULL),
    (RuntimeError("[enforce fail at inline_container.cc:445] . PytorchStreamWriter failed writing file data/0: "
                  "file write failed"), DISK_FULL),
    (OSError(errno.EMFILE, "Too many open files"), "The server has too many files open right now; try again in a "
                                                   "minute."),
    (ValueError("bad value"), None),
    (FileNotFoundError(errno.ENOENT, "No such file", "/srv/secret/x"), None),
], ids=["ENOSPC", "EDQUOT", "ENAMETOOLONG", "wrapped-ENOSPC", "torch-unexpected-pos", "torch-stream-writer",
        "EMFILE", "not-an-os-error", "ENOENT"])
def test_os_error_message_maps_operating_system_errors_without_a_path(exc, expected):
    message = os_error_message(exc)
    assert message == expected
    assert message is None or "/srv" not in message


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))

"""``flor-ray check | compact | du | gc | spool``: the commands that look after a store."""

from __future__ import annotations

import argparse
from typing import Callable

__all__ = ["add_store_commands"]


def cmd_check(a) -> int:
    from .api import resolve_store
    from .store.damage import QUARANTINE, quarantine, scan

    st = resolve_store(a.store).check()
    damages = scan(st)
    if not damages:
        print(f"no damaged files in {st.url}")
    for d in damages:
        print(f"damaged: {d}")
    if damages and not a.repair:
        print(f"{len(damages)} damaged; `flor-ray check --repair` moves them to {st.full_url(QUARANTINE)} "
              "(nothing is deleted)")
        return 1
    for d, dest in zip(damages, quarantine(st, damages)):
        print(f"moved {d.path} to {st.full_url(dest)}")
    if a.repair:
        from .config import load_settings
        from .store.compaction import compact_ended

        from .store.consolidation import consolidate

        settings = load_settings()
        for rid, done in compact_ended(st, settings.compact_after):
            print(f"compacted {len(done.deleted)} record parts of run {rid} into {len(done.written)} file(s)")
        if settings.compact_after and settings.consolidate_after:
            _print_consolidated(consolidate(st))
    return 0


def _print_consolidated(done) -> None:
    if done.written:
        print(f"consolidated {len(done.deleted)} files of {len(done.runs)} runs into {len(done.written)} "
              f"segment(s): {', '.join(done.written)}")


def cmd_compact(a) -> int:
    from .api import resolve_store
    from .config import load_settings
    from .store.compaction import compact_ended
    from .store.consolidation import consolidate

    st = resolve_store(a.store).check()
    for rid, done in compact_ended(st, max(load_settings().compact_after, 1)):
        print(f"compacted {len(done.deleted)} record parts of run {rid} into {len(done.written)} file(s)")
    done = consolidate(st, replay_grace_s=a.replay_grace, merge_all=True)
    _print_consolidated(done)
    if not done.written:
        print(f"nothing to consolidate in {st.url}")
    return 0


def cmd_du(a) -> int:
    from .api import resolve_store
    from .store.usage import disk_usage, human

    st = resolve_store(a.store).check()
    du = disk_usage(st)
    print(f"{'kind':<20} {'files':>8} {'bytes':>14}  size")
    for u in du.kinds:
        print(f"{u.kind:<20} {u.files:>8} {u.bytes:>14}  {human(u.bytes)}")
    print(f"{'total':<20} {sum(u.files for u in du.kinds):>8} {du.total:>14}  {human(du.total)}")
    if a.runs:
        print(f"\n{'run':<28} {'meta':>10} {'logs':>12} {'checkpoints':>12} {'objects':>12} {'total':>12}")
        for r in du.runs:
            print(f"{r.run_id:<28} {r.meta:>10} {r.logs:>12} {r.checkpoints:>12} {r.objects:>12} {r.total:>12}")
    return 0


def cmd_gc(a) -> int:
    from .api import resolve_store
    from .store.retention import Policy, collect
    from .store.usage import human

    st = resolve_store(a.store).check()
    report = collect(st, Policy(a.keep_every, a.keep_last_runs, a.where), dry_run=a.dry_run)
    verb = "would delete" if a.dry_run else "deleted"
    for run_id, why in report.skipped:
        print(f"skipped run {run_id}: {why}")
    for c in report.checkpoints:
        print(f"{verb} {c.path} ({c.bytes} bytes)")
    if report.objects:
        print(f"{verb} {len(report.objects)} shared tensor objects ({sum(b for _, b in report.objects)} bytes)")
    print(f"{verb} {len(report.checkpoints)} checkpoints, {report.bytes} bytes ({human(report.bytes)})"
          + ("; run without --dry-run to delete them" if a.dry_run and report.checkpoints else ""))
    return 0


def cmd_spool(a) -> int:
    from .config import load_settings
    from .record.spool import spool_folders, upload_spool
    from .store import Store

    folders = a.folders or spool_folders(load_settings().spool_dir)
    if not folders:
        print("no spooled runs")
        return 0
    store = Store(a.store) if a.store else None
    for folder in folders:
        written = upload_spool(folder, store)
        print(f"uploaded {len(written)} files of {folder}")
    return 0


def add_store_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    sp = add("check", cmd_check, "list the store's damaged or foreign files (left out of queries); exit 1 "
             "if any", "flor-ray check --repair")
    sp.add_argument("--repair", action="store_true",
                    help="move the damaged files to the store's quarantine/ folder (nothing is deleted), then "
                         "compact the record parts of runs that ended without compacting them (crashed)")

    sp = add("compact", cmd_compact, "compact the record parts of ended runs (crashed ones too; never of a run "
             "that is recording), then merge the files of ended runs and replay partitions into as few segments "
             "as the store needs, so that queries open a few files", "flor-ray compact")
    sp.add_argument("--replay-grace", type=float, default=600.0, metavar="SECONDS",
                    help="leave replay partitions younger than this (a replay in progress may still move or "
                         "rewrite them; default 600)")

    sp = add("du", cmd_du, "show the store's size by kind (runs, logs, checkpoints, checkpoint objects, code, "
             "replays), and per run with --runs", "flor-ray du --runs")
    sp.add_argument("--runs", action="store_true", help="also list each run's bytes")

    sp = add("gc", cmd_gc, "delete the checkpoints a retention policy does not keep (never of a run that is "
             "recording); replays then start from the kept ones", "flor-ray gc --keep-every 5 --keep-last-runs 3 "
             "--dry-run")
    sp.add_argument("--keep-every", type=int, metavar="K",
                    help="keep each run's checkpoints 0, K, 2K, ... and its last one")
    sp.add_argument("--keep-last-runs", type=int, metavar="N", help="keep every checkpoint of the last N runs")
    sp.add_argument("--where", metavar="EXPR",
                    help="keep every checkpoint of the runs this SQL expression over the runs table selects")
    sp.add_argument("--dry-run", action="store_true", help="list what would be deleted, and the bytes; delete nothing")

    sp = add("spool", cmd_spool, "upload the rows and metadata that recordings spooled while their store "
             "could not be written", "flor-ray spool upload ~/.cache/flor_ray/spool/20261201T101500-a1b2c3")
    sp.add_argument("action", choices=["upload"], help="upload: move the spooled files into their store")
    sp.add_argument("folders", nargs="*", metavar="FOLDER",
                    help="spool folders of runs (default: every run under FLOR_SPOOL / spool_dir)")

"""URL + caption lists -> webdataset shards with img2dataset, plus a data report and a shard manifest.

    galip download --profile demo      # builds the demo scenes, serves them on 127.0.0.1, downloads
    galip download --profile cc12m     # data/cc12m/cc12m.tsv as CC12M publishes it

Steps: (1) stream the list into parquet parts ourselves (CC12M's TSV has no header and captions that
start with a quote, which img2dataset's CSV reader silently merges with the next row), counting
malformed rows with their line numbers; (2) img2dataset in incremental mode (an interrupted run
redoes only unfinished shards); (3) aggregate img2dataset's per-shard stats into a report; (4) a
manifest (shard, samples, sha256, bytes): at CC12M scale that small file is what DVC versions.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import logging
import os
import re
import shutil
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config, DataConfig
from ..errors import UserError
from ..ops.storage import is_remote, s3_filesystem

log = logging.getLogger("galip.download")

PART_ROWS = 1_000_000  # rows per parquet part: bounds memory in img2dataset's reader
MAX_REPORTED_LINES = 100


class UrlListError(UserError):
    """``data.url_list`` is missing, not a file, not UTF-8, or holds no usable row."""


@dataclass
class ListStats:
    rows: int = 0
    malformed: int = 0
    malformed_lines: list[int] = field(default_factory=list)

    def bad(self, line_no: int) -> None:
        self.malformed += 1
        if len(self.malformed_lines) < MAX_REPORTED_LINES:
            self.malformed_lines.append(line_no)


# --- (1) the URL list -------------------------------------------------------------------------------
def _tsv_rows(path: Path, stats: ListStats) -> Iterator[tuple[int, str, str]]:
    """url<TAB>caption rows, no header, no quoting: every other shape is malformed and counted.

    Lines are decoded one by one, strictly: a byte that is not UTF-8 stops the conversion naming its
    line, where a lenient decoder would silently turn captions into U+FFFD."""
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                raise UrlListError(
                    f"data.url_list={path}: line {line_no} is not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                    "re-encode the list as UTF-8 (e.g. iconv -f LATIN1 -t UTF-8)"
                ) from None
            if line_no == 1:
                # Spreadsheet exports start with a byte-order mark; left in, it would become part of the first URL.
                line = line.removeprefix("\ufeff")
            if not line:
                continue
            fields = line.split("\t")
            if len(fields) != 2 or not fields[0].strip():
                stats.bad(line_no)
                continue
            yield line_no, fields[0].strip(), fields[1]


def _parquet_rows(path: Path, url_col: str, caption_col: str, stats: ListStats) -> Iterator[tuple[int, str, str]]:
    import pyarrow.parquet as pq

    import pyarrow as pa

    try:
        pf = pq.ParquetFile(path)
    except pa.ArrowException as exc:
        raise UrlListError(f"data.url_list={path} is not a readable parquet file ({exc})") from None
    missing = {url_col, caption_col} - set(pf.schema_arrow.names)
    if missing:
        raise UrlListError(f"{path}: columns {sorted(missing)} not found (data.url_col / data.caption_col; has {pf.schema_arrow.names})")
    line_no = 0
    for batch in pf.iter_batches(batch_size=65_536, columns=[url_col, caption_col]):
        for url, caption in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            line_no += 1
            if not url:
                stats.bad(line_no)
                continue
            yield line_no, url, caption or ""


def _write_parts(rows: Iterator[tuple[str, str]], out_dir: Path) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("part-*.parquet"):
        old.unlink()
    parts: list[Path] = []
    urls: list[str] = []
    caps: list[str] = []

    def flush() -> None:
        path = out_dir / f"part-{len(parts):05d}.parquet"
        pq.write_table(pa.table({"url": urls, "caption": caps}), path)
        parts.append(path)
        urls.clear()
        caps.clear()

    for url, caption in rows:
        urls.append(url)
        caps.append(caption)
        if len(urls) == PART_ROWS:
            flush()
    if urls or not parts:
        flush()
    return parts


def prepare_url_list(data: DataConfig, out_dir: Path, base_url: str = "", refused_url: str = "") -> ListStats:
    """Stream ``data.url_list`` (TSV or parquet) into parquet parts under ``out_dir``.

    ``base_url`` resolves relative URLs (the demo list) against the local HTTP server. Absolute
    paths become file:// URLs; any other URL without a scheme is malformed (img2dataset would fail
    on it silently: rc 0, empty shards). The list is read once to validate it before anything is
    written (a list that is refused leaves no folder behind), then again to write the parts.
    """
    src = check_url_list(data)
    check = ListStats()
    for _ in _resolved_rows(src, data, base_url, refused_url, check):
        pass
    if check.rows == 0:
        raise UrlListError(
            f"data.url_list={src} holds no usable row ({check.malformed} malformed"
            f"{', lines ' + ', '.join(map(str, check.malformed_lines[:10])) if check.malformed_lines else ''}); "
            "expected url<TAB>caption lines (or a parquet file with data.url_col/data.caption_col)"
        )
    stats = ListStats()
    _write_parts(_resolved_rows(src, data, base_url, refused_url, stats), out_dir)
    return stats


def _resolved_rows(src: Path, data: DataConfig, base_url: str, refused_url: str, stats: ListStats) -> Iterator[tuple[str, str]]:
    """(url, caption) rows img2dataset can fetch; malformed ones are counted in ``stats``."""
    from .demo_data import REFUSED_PREFIX

    if src.suffix == ".parquet":
        rows = _parquet_rows(src, data.url_col, data.caption_col, stats)
    else:
        rows = _tsv_rows(src, stats)
    for line_no, url, caption in rows:
        if url.startswith(REFUSED_PREFIX):
            url = f"{refused_url}/{url[len(REFUSED_PREFIX):]}"
        elif "://" not in url:
            if url.startswith("/"):
                url = f"file://{url}"
            elif base_url:
                url = f"{base_url}/{url}"
            else:
                stats.bad(line_no)
                continue
        stats.rows += 1
        yield url, caption


def check_url_list(data: DataConfig) -> Path:
    src = Path(data.url_list)
    if not src.exists():
        raise UrlListError(f"data.url_list={src} does not exist (CC12M: download cc12m.tsv yourself and put it there)")
    if not src.is_file():
        raise UrlListError(f"data.url_list={src} is {_file_kind(src)}; point data.url_list at the list file (TSV or parquet)")
    return src


def _file_kind(path: Path) -> str:
    """What a path that is not a regular file is, in words (``/dev/zero`` is no folder)."""
    import stat

    mode = path.stat().st_mode
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"))
    return next((words for test, words in kinds if test(mode)), "not a regular file")


# --- the demo's local HTTP source ------------------------------------------------------------------------
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve_directory(path: Path) -> Iterator[str]:
    """Serve ``path`` over HTTP on 127.0.0.1 (free port) for the duration; yields the base URL."""
    handler = lambda *a, **kw: _QuietHandler(*a, directory=str(path), **kw)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there: connection refused


def ensure_demo_source(data: DataConfig) -> Path:
    """Generate the demo scenes + URL list next to ``data.url_list`` when they are not there yet.

    Generation is deterministic (byte-identical files from ``data.demo_seed``), so a regenerated
    source matches what data.dvc records.
    """
    from .demo_data import make_demo_dataset

    if not data.demo_images:
        raise ValueError("data.demo_images is 0: this profile has no demo source to generate")
    root = Path(data.url_list).parent
    if not Path(data.url_list).exists() or not (root / "images").is_dir():
        log.info("generating %d demo scenes in %s", data.demo_images, root)
        make_demo_dataset(root, data.demo_images, data.image_size, data.demo_seed, broken=data.demo_broken)
    return root


# --- (2) img2dataset ---------------------------------------------------------------------------------------
def _check_spawnable_main() -> None:
    """img2dataset's workers are spawned and re-import ``__main__``; from ``python -`` (stdin) that
    import fails in every worker and its pool respawns them forever, a hang instead of an error."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file and not Path(main_file).exists():
        raise RuntimeError(
            f"galip download cannot run from {main_file!r}: img2dataset's worker processes re-import the "
            "main script. Run `galip download`, `python -m galip download`, or a script saved to a file."
        )


def run_img2dataset(data: DataConfig, list_dir: Path) -> None:
    _check_spawnable_main()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    from img2dataset import download

    if is_remote(data.shards_dir):
        # img2dataset's workers open the prefix through fsspec/s3fs: they read the endpoint from the environment
        endpoint = data.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL", "")
        if endpoint:
            os.environ["AWS_ENDPOINT_URL"] = os.environ["FSSPEC_S3_ENDPOINT_URL"] = endpoint
        output_folder = data.shards_dir.rstrip("/")
    else:
        Path(data.shards_dir).mkdir(parents=True, exist_ok=True)
        output_folder = str(Path(data.shards_dir).resolve())
    download(
        url_list=str(list_dir),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        output_format="webdataset",
        output_folder=output_folder,
        image_size=data.image_size,
        resize_mode=data.resize_mode,
        encode_quality=data.encode_quality,
        encode_format="jpg",
        number_sample_per_shard=data.samples_per_shard,
        processes_count=data.processes,
        thread_count=data.threads,
        timeout=data.timeout,
        retries=data.retries,
        distributor="multiprocessing",
        incremental_mode="incremental",
        enable_wandb=False,
        compute_hash="sha256",
    )


# --- (3) report and (4) manifest --------------------------------------------------------------------------------
_OPENCV = re.compile(r"OpenCV\([^)]*\) \S+ error: (.*)")


def failure_reason(message: str) -> str:
    """One readable line per failure kind: img2dataset keys its histogram by raw exception text."""
    line = (message.strip().splitlines() or [""])[0]
    opencv = _OPENCV.match(line)
    if opencv:  # drop the build path and line number, which differ between OpenCV builds
        line = f"OpenCV error: {opencv.group(1)}"
    return line[:160]


def shard_store(data: DataConfig) -> tuple[Any, str]:
    """(fsspec filesystem, root) of ``data.shards_dir``: a local folder or an s3:// prefix."""
    if is_remote(data.shards_dir):
        return s3_filesystem(data.s3_endpoint_url), data.shards_dir.rstrip("/")
    import fsspec

    return fsspec.filesystem("file"), str(Path(data.shards_dir).resolve())


def _names(fs: Any, root: str, suffix: str) -> list[str]:
    return sorted(p.rsplit("/", 1)[-1] for p in fs.glob(f"{root}/*{suffix}"))


def aggregate_stats(fs: Any, root: str) -> dict[str, Any]:
    """Sum img2dataset's ``*_stats.json`` (one per finished shard) into totals and a failure histogram."""
    totals: Counter = Counter()
    reasons: Counter = Counter()
    start, end = float("inf"), 0.0
    for name in _names(fs, root, "_stats.json"):
        s = json.loads(fs.cat_file(f"{root}/{name}"))
        totals.update(count=s["count"], successes=s["successes"], failed_to_download=s["failed_to_download"],
                      failed_to_resize=s["failed_to_resize"])
        for message, n in s.get("status_dict", {}).items():
            if message != "success":
                reasons[failure_reason(message)] += n
        start, end = min(start, s["start_time"]), max(end, s["end_time"])
    duration = max(end - start, 0.0) if totals else 0.0
    return {
        "rows": totals["count"],
        "successes": totals["successes"],
        "failed": totals["count"] - totals["successes"],
        "failed_to_download": totals["failed_to_download"],
        "failed_to_resize": totals["failed_to_resize"],
        "success_rate": round(totals["successes"] / totals["count"], 4) if totals["count"] else 0.0,
        "failure_reasons": dict(reasons.most_common()),
        "duration_s": round(duration, 2),
        "images_per_s": round(totals["successes"] / duration, 1) if duration else 0.0,
    }


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return _sha256_stream(fh)


def _sha256_stream(fh: Any) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: fh.read(1 << 22), b""):
        h.update(chunk)
    return h.hexdigest()


def build_manifest(fs: Any, root: str, shards_dir: str) -> dict[str, Any]:
    """Every complete shard (img2dataset wrote its stats) with sample count, sha256 and size. The shards
    are read once here, where they were written (a folder or the S3 prefix), so the hashes are of what
    training will read."""
    from concurrent.futures import ThreadPoolExecutor

    done = [n.removesuffix("_stats.json") for n in _names(fs, root, "_stats.json")]
    tars = set(_names(fs, root, ".tar"))

    def entry(stem: str) -> dict[str, Any]:
        samples = json.loads(fs.cat_file(f"{root}/{stem}_stats.json"))["successes"]
        with fs.open(f"{root}/{stem}.tar", "rb") as fh:
            digest = _sha256_stream(fh)
        return {"shard": f"{stem}.tar", "samples": samples, "sha256": digest, "bytes": fs.size(f"{root}/{stem}.tar")}

    with ThreadPoolExecutor(max_workers=8) as pool:
        shards = list(pool.map(entry, [s for s in done if f"{s}.tar" in tars]))
    return {
        "shards_dir": shards_dir,
        "shards": shards,
        "samples": sum(s["samples"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
    }


def incomplete_shards(fs: Any, root: str) -> list[str]:
    """Tars with no ``_stats.json``: img2dataset writes the stats last, so these were interrupted."""
    stats = set(_names(fs, root, "_stats.json"))
    return [t for t in _names(fs, root, ".tar") if f"{t.removesuffix('.tar')}_stats.json" not in stats]


def manifest_hash(manifest: dict[str, Any]) -> str:
    """One hash of the shards' contents (names and sha256), whatever file the manifest is written to."""
    body = json.dumps([[s["shard"], s["sha256"]] for s in manifest["shards"]]).encode()
    return hashlib.sha256(body).hexdigest()[:16]


def file_md5(path: Path) -> str:
    """md5 of a file as DVC 3 records an output's hash (dvc.lock ``md5``): the data version's DVC id."""
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def manifest_urls(manifest: dict[str, Any]) -> list[str]:
    root = manifest["shards_dir"].rstrip("/")
    return [f"{root}/{s['shard']}" for s in manifest["shards"]]


def verify_manifest(manifest_path: Path, endpoint_url: str = "", copy_to: Path | None = None) -> dict[str, Any]:
    """Read every shard the manifest lists from where it says they are and check sha256 and size;
    with ``copy_to`` keep a local copy of each. Returns counts and the shards that do not match."""
    from tqdm.auto import tqdm

    manifest = json.loads(Path(manifest_path).read_text())
    root = manifest["shards_dir"].rstrip("/")
    if is_remote(root):
        fs = s3_filesystem(endpoint_url)
    else:
        import fsspec

        fs = fsspec.filesystem("file")
    bad: list[str] = []
    if copy_to:
        Path(copy_to).mkdir(parents=True, exist_ok=True)
    for entry in tqdm(manifest["shards"], desc="verify shards", unit="shard", disable=None):
        url = f"{root}/{entry['shard']}"
        h, size = hashlib.sha256(), 0
        sink = open(Path(copy_to) / entry["shard"], "wb") if copy_to else None
        try:
            with fs.open(url, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
                    size += len(chunk)
                    if sink:
                        sink.write(chunk)
        except FileNotFoundError:
            bad.append(f"{url}: missing")
            continue
        finally:
            if sink:
                sink.close()
        if h.hexdigest() != entry["sha256"] or size != entry["bytes"]:
            bad.append(f"{url}: sha256 {h.hexdigest()[:12]}.. / {size} B, manifest says {entry['sha256'][:12]}.. / {entry['bytes']} B")
    return {"manifest": str(manifest_path), "manifest_md5": file_md5(Path(manifest_path)), "manifest_hash": manifest_hash(manifest),
            "shards": len(manifest["shards"]), "verified": len(manifest["shards"]) - len(bad), "mismatches": bad}


def output_paths(data: DataConfig) -> dict[str, Path]:
    manifest = Path(data.manifest)
    return {"manifest": manifest, "report": Path(data.report), "list_dir": manifest.parent / f".{manifest.stem}_url_parts"}


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="data report", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("rows", "successes", "failed", "success_rate", "malformed_rows", "shards", "incomplete_shards", "bytes",
                "duration_s", "images_per_s"):
        value = report.get(key)
        table.add_row(key, str(len(value) if isinstance(value, list) else value))
    for reason, n in report["failure_reasons"].items():
        table.add_row(f"  failed: {reason[:60]}", str(n))
    Console(stderr=True).print(table)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


# Keys that change what a shard holds. Resuming into shards written with other values would mix
# two data sets (img2dataset's incremental mode only asks whether a shard id is done).
FINGERPRINT_KEYS = ("url_col", "caption_col", "image_size", "resize_mode", "encode_quality", "samples_per_shard")
FINGERPRINT_FILE = "download_params.yaml"  # not *.json: img2dataset reads every *.json there as shard stats


class StaleShardsError(UserError, RuntimeError):
    """``data.shards_dir`` holds shards made from another list or with other settings."""


def _fingerprint(data: DataConfig) -> dict[str, Any]:
    return {"url_list_sha256": _sha256(Path(data.url_list)), **{k: getattr(data, k) for k in FINGERPRINT_KEYS}}


def check_fingerprint(data: DataConfig) -> dict[str, Any]:
    """Refuse to resume into shards made differently (reads only); the settings to record once the
    list has been validated (``record_fingerprint``)."""
    import yaml

    fs, root = shard_store(data)
    path = f"{root}/{FINGERPRINT_FILE}"
    current = _fingerprint(data)
    if fs.exists(path):
        recorded = yaml.safe_load(fs.cat_file(path)) or {}
        changed = sorted(k for k in current if recorded.get(k) != current[k])
        if changed:
            raise StaleShardsError(
                f"{data.shards_dir} was written with different {', '.join(changed)} (see {path}). Shards are never "
                "overwritten: set data.shards_dir to a new folder or prefix (or delete that one); resuming would mix two data sets."
            )
    return current


def record_fingerprint(data: DataConfig, fingerprint: dict[str, Any]) -> None:
    import yaml

    fs, root = shard_store(data)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/{FINGERPRINT_FILE}", yaml.safe_dump(fingerprint, sort_keys=False).encode())


def run(cfg: Config) -> dict[str, Any]:
    """Download ``data.url_list`` into ``data.shards_dir``; returns the report (with manifest path and hash)."""
    data = cfg.data
    paths = output_paths(data)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        base_url = refused = ""
        if data.demo_images:
            root = ensure_demo_source(data)
            base_url = stack.enter_context(serve_directory(root))
            refused = _closed_port_url()
        check_url_list(data)
        fingerprint = check_fingerprint(data)
        # The converted list holds this run's server address (demo): a scratch copy, removed after.
        stack.callback(shutil.rmtree, paths["list_dir"], ignore_errors=True)
        # Validates the whole list before writing its parts: a refused list leaves shards_dir untouched,
        # so the rerun after the fix its error suggests is not refused as "written with another list".
        list_stats = prepare_url_list(data, paths["list_dir"], base_url, refused)
        record_fingerprint(data, fingerprint)
        run_img2dataset(data, paths["list_dir"])
    fs, root = shard_store(data)
    manifest = build_manifest(fs, root, data.shards_dir)
    report = {
        **aggregate_stats(fs, root),
        # complete shards only: a tar without its stats file is one an interrupted run left half written
        "shards": len(manifest["shards"]),
        "bytes": manifest["bytes"],
        "incomplete_shards": incomplete_shards(fs, root),
        "malformed_rows": list_stats.malformed,
        "malformed_lines": list_stats.malformed_lines,
        "list_rows": list_stats.rows,
        "wall_s": round(time.perf_counter() - t0, 2),
        "manifest": str(paths["manifest"]),
        "manifest_hash": manifest_hash(manifest),
        "shards_dir": data.shards_dir,
    }
    paths["manifest"].parent.mkdir(parents=True, exist_ok=True)
    _write_json(paths["manifest"], manifest)
    report["manifest_md5"] = file_md5(paths["manifest"])
    paths["report"].parent.mkdir(parents=True, exist_ok=True)
    _write_json(paths["report"], report)
    print_report(report)
    return report

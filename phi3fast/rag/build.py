"""Building an index: scan the paths, chunk what changed, embed it, and hand it to the store's writer, under the
index's writer lock; the manifest switch at the end makes the build visible at once (see manifest.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from phi3fast.errors import ArgumentError, Phi3FastError
from phi3fast.rag.chunking import chunk_document
from phi3fast.rag.embedders import DEFAULT_EMBEDDER, Embedder, canonical_name, shared_embedder
from phi3fast.rag.manifest import FORMAT, MANIFEST, VERSION, read_manifest, write_manifest
from phi3fast.rag.readers import SkipFile, iter_files, read_documents
from phi3fast.rag.stores import open_writer, parse_store, same_store, store_label
from phi3fast.rag.stores.base import Plan, StoreWriter
from phi3fast.rag.stores.builtin import BuiltinStore

# The default embedder, all-MiniLM-L6-v2, was trained on inputs of at most 128 tokens: a chunk (with its heading)
# of that size is what it embeds best. Measured on the tuning questions (bench/retrieval_sweep.py; docs/indexing.md,
# "Retrieval quality: what was tried"), hybrid search ranked the right document first for 0.950 of them with
# 128/16, 0.938 with 96/12, 192/24 or 256/32.
DEFAULT_CHUNK_TOKENS = 128
DEFAULT_OVERLAP = 16


@dataclass(frozen=True)
class BuildStats:
    files_added: int
    files_changed: int
    files_unchanged: int
    files_deleted: int
    files_skipped: int
    chunks_embedded: int
    chunks_total: int
    seconds: float  # the whole run after the embedder is loaded
    embed_seconds: float  # of which: inside the embedder

    @property
    def chunks_per_second(self) -> float:
        return self.chunks_embedded / self.seconds if self.seconds > 0 else 0.0


def warn_stderr(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


@contextmanager
def writer_lock(out: Path) -> Iterator[None]:
    """One writer per index: flock on INDEX_DIR/.lock (released by the kernel if the process dies)."""
    f = open(out / ".lock", "a+")  # noqa: SIM115
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Phi3FastError(
                f"{out}: another `phi3fast index` is writing this index (lock held)"
            ) from None
        yield
    finally:
        f.close()


def plan_changes(
    roots: list[Path],
    old: dict[str, str],
    emb: Embedder,
    config: dict,
    warn: Callable[[str], None],
) -> Plan:
    """Scan the paths; compare each file's content hash with `old` ({source: sha256} of the index)."""
    plan = Plan()

    def budget(heading: str) -> int:
        room = emb.max_seq_length - 2 - (emb.count_tokens(heading) + 1 if heading else 0)
        return max(config["overlap"] + 8, min(config["chunk_tokens"], room))

    for path, source in iter_files(roots):
        try:
            data = path.read_bytes()
        except OSError as e:  # permissions, a file removed mid-run: skip it like any unusable file
            warn(f"{path}: skipped: unreadable ({e.strerror or e})")
            plan.skipped += 1
            continue
        # Which files changed: content hash, not mtime (a copy or checkout touches mtimes of unchanged files).
        sha = hashlib.sha256(data).hexdigest()
        if old.get(source) == sha:
            plan.seen.add(source)
            plan.unchanged += 1
            continue
        try:
            docs = read_documents(path, source)
        except SkipFile as e:
            warn(f"{path}: skipped: {e}")
            plan.skipped += 1
            continue
        chunks = [c for d in docs for c in chunk_document(d, emb.token_offsets, budget, config["overlap"])]
        if not chunks:
            warn(f"{path}: skipped: no text to index")
            plan.skipped += 1
            continue
        plan.seen.add(source)
        plan.todo.append((source, sha, chunks))
        plan.changed += source in old
        plan.added += source not in old
    plan.removed = [s for s in old if s not in plan.seen]
    return plan


def _same_embedder(a: dict, b: dict) -> bool:
    """Same vectors: trust_remote_code is how a model may be loaded, not which model it is."""
    keys = ("name", "dim", "max_seq_length")
    return all(a.get(k) == b.get(k) for k in keys)


def _check_out_dir(out: Path, wanted: dict | None) -> None:
    if out.exists() and not out.is_dir():
        raise ArgumentError("out", f"{out}: exists and is not a directory")
    if not out.is_dir():
        return
    allowed = {MANIFEST, ".lock", MANIFEST + ".tmp"}
    lite = {(wanted or {}).get("uri")}  # a Milvus Lite file may sit in the index directory
    try:
        lite.add(read_manifest(out)["store"].get("uri"))
    except Phi3FastError:
        pass
    foreign = [p.name for p in out.iterdir() if p.name not in allowed and str(p.resolve()) not in lite]
    foreign = [n for n in foreign if not n.startswith("gen-")]
    if foreign:
        raise ArgumentError("out", f"{out}: not an index directory (it holds {foreign[0]!r}); pick a new one")


def build_index(
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    embedder: str | Embedder | None = None,
    chunk_tokens: int | None = None,
    overlap: int | None = None,
    store: str | None = None,
    reranker: str | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    warn: Callable[[str], None] = warn_stderr,
) -> tuple[Embedder, BuildStats]:
    """Index the files under `paths` into `out` (see Index.build); return the embedder used and the stats."""
    out = Path(out)
    roots = [Path(p) for p in paths]
    if not roots:
        raise Phi3FastError("nothing to index: give at least one file or folder")
    wanted = parse_store(store) if store is not None else None
    _check_out_dir(out, wanted)
    out.mkdir(parents=True, exist_ok=True)
    with writer_lock(out):
        prev = None
        if (out / MANIFEST).exists():
            try:
                prev = read_manifest(out)
            except Phi3FastError as e:
                warn(f"{e}; rebuilding the index from scratch")
        if prev is not None and wanted is not None and not same_store(prev["store"], wanted):
            raise ArgumentError(
                "store",
                f"{store}: the index {out} lives in {store_label(prev['store'])}; it cannot move to "
                f"{store_label(wanted)}: build into a new index directory",
            )
        store_cfg = prev["store"] if prev is not None else (wanted or {"kind": "builtin"})
        if isinstance(embedder, Embedder):
            name = embedder.name
        elif isinstance(embedder, str):
            name = canonical_name(embedder)
        else:
            name = prev["embedder"]["name"] if prev else DEFAULT_EMBEDDER
        if chunk_tokens is None:
            chunk_tokens = prev["chunk_tokens"] if prev else DEFAULT_CHUNK_TOKENS
        overlap = overlap if overlap is not None else (prev["overlap"] if prev else DEFAULT_OVERLAP)
        if chunk_tokens < 16:
            raise ArgumentError("chunk_tokens", f"must be >= 16, got {chunk_tokens}")
        if not 0 <= overlap < chunk_tokens // 2:
            raise ArgumentError(
                "overlap", f"must be in [0, chunk_tokens/2) = [0, {chunk_tokens // 2}), got {overlap}"
            )
        if isinstance(embedder, Embedder):
            emb = embedder
            trust_remote_code = bool(getattr(emb, "trust_remote_code", trust_remote_code))
        else:
            emb = shared_embedder(name, trust_remote_code=trust_remote_code)
        t0 = time.perf_counter()  # after the model load: the stats measure indexing, not start-up
        if chunk_tokens > emb.max_seq_length:
            # Longer chunks would be silently cut by the model: refuse instead. (Up to the window itself is
            # fine: each chunk's budget also leaves room for the special tokens and its heading.)
            raise ArgumentError(
                "chunk_tokens",
                f"{chunk_tokens} exceeds the {emb.max_seq_length}-token window of embedder '{emb.name}'",
            )
        if reranker is None and prev is not None:
            reranker_cfg = prev.get("reranker")
        else:
            reranker_cfg = {"name": reranker} if reranker else None  # "" drops the index's reranker
        config = {
            "embedder": {**asdict(emb.info), "trust_remote_code": trust_remote_code},
            "reranker": reranker_cfg,
            "chunk_tokens": chunk_tokens,
            "overlap": overlap,
        }
        fresh = (
            prev is None
            or not _same_embedder(prev["embedder"], config["embedder"])
            or (prev["chunk_tokens"], prev["overlap"]) != (chunk_tokens, overlap)
        )
        if prev is not None and fresh:
            warn(f"{out}: embedder or chunking changed; re-embedding every file")
        elif prev is not None and store_cfg["kind"] == "builtin":
            try:  # an update starts from the current generation: it must be whole
                BuiltinStore(out, prev).close()
            except Phi3FastError as e:
                warn(f"{e}; rebuilding the index from scratch")
                fresh = True
        # (Milvus: the writer reads which file versions are in from the collection itself, the truth.)
        writer = open_writer(out, store_cfg, prev, fresh, emb.dim, progress, warn)
        stats = _run_build(out, writer, roots, emb, config, prev, warn, progress, t0)
    return emb, stats


def _run_build(
    out: Path,
    writer: StoreWriter,
    roots: list[Path],
    emb: Embedder,
    config: dict,
    prev: dict | None,
    warn: Callable[[str], None],
    progress: bool,
    t0: float,
) -> BuildStats:
    """The build every store shares: plan, embed in batches, hand each batch to the writer, commit."""
    try:
        old = writer.file_hashes()
        plan = plan_changes(roots, old, emb, config, warn)
        writer.begin(plan, old)
        flat = [(source, sha, i, c) for source, sha, chunks in plan.todo for i, c in enumerate(chunks)]
        texts = [c.embed_text() for *_, c in flat]
        pos = 0
        embed_s = 0.0
        batches = emb.encode_batches(texts, progress=progress)
        while True:
            t_embed = time.perf_counter()
            vecs = next(batches, None)
            embed_s += time.perf_counter() - t_embed
            if vecs is None:
                break
            writer.add(flat[pos : pos + len(vecs)], vecs)
            pos += len(vecs)
        fields, changed = writer.commit(plan, old)
        manifest = {"format": FORMAT, "version": VERSION, **config, **fields, "files": len(plan.seen)}
        if changed:
            write_manifest(out, manifest)
        elif prev is not None and prev.get("reranker") != config["reranker"]:
            # Only the reranker changed: no new generation, the same one with the new setting.
            write_manifest(out, {**prev, "reranker": config["reranker"]})
    except BaseException:
        writer.abort()
        raise
    if changed:
        writer.cleanup()
    return BuildStats(
        plan.added,
        plan.changed,
        plan.unchanged,
        len(plan.removed),
        plan.skipped,
        len(texts),
        int(fields["chunks"]),
        time.perf_counter() - t0,
        embed_s,
    )

"""The torch-free screening runtime: load an ONNX bundle, tokenize, look up embeddings, monitor, purge.

Never imports torch or transformers: ``tokenizers`` + NumPy + ONNX Runtime only (a test runs a
scan with torch made unimportable).

A bundle (written by ``lmsan export``) is a folder::

    manifest.json    {"format": "lmsan.bundle", "version": 1, ..., "files": {name: "sha256:<hex>"}}
    model.onnx       the backbone: inputs ``inputs_embeds`` float32 [batch, seq, emb] and
                     ``attention_mask`` int64 [batch, seq]; outputs ``last_hidden_state``
                     (+ ``pooler_output`` when a PV targets ``pooler``)
    embeddings.npy   the word-embedding table, float32 [vocab, emb]
    tokenizer.json   the fast tokenizer (special-token ids are in the manifest)
    pvset.json       the PV set (``lmsan.pvset`` format)
    prompt.npy       optional soft prompt float32 [l, emb] (a P-tuning task prompt)

How an input becomes the backbone's input (the same in export validation and in scan):
the text is tokenized with the bundle's tokenizer (special tokens added, no truncation), the ids
are looked up in ``embeddings.npy``, the soft prompt (if any) is inserted right after the first
special token (position 1 when the encoding starts with ``[CLS]``/``<s>``, else position 0),
and the batch is right-padded (pad rows are the pad token's embedding, attention 0).

Target positions: ``cls`` = the first special token (position 0 for BERT/RoBERTa); ``pooler`` =
``pooler_output``; ``tokens`` = every ordinary token (not special, not prompt, not padding; any
token over the threshold flags the record); ``mask`` = the mask token of the template
``f"{sentence} {mask_token}"`` (for a pair, the template is applied to the second sentence).
Targets that read plain text (cls, pooler, tokens) share one forward pass; ``mask`` needs the
template and so its own pass. A clean record therefore costs one forward pass per input form,
which is one for every PV set that ``lmsan audit`` writes (one target).
"""

from __future__ import annotations

import hashlib
import json
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import monitor as mon
from .errors import FormatError, InputError, UsageError, check_header
from .pvset import TARGETS, PVSet

FORMAT = "lmsan.bundle"
VERSION = 1
MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"
EMBEDDINGS_FILE = "embeddings.npy"
TOKENIZER_FILE = "tokenizer.json"
PVSET_FILE = "pvset.json"
PROMPT_FILE = "prompt.npy"
MASK_TEMPLATE = "{sentence} {mask_token}"
PLAIN_TARGETS = ("cls", "pooler", "tokens")
PROVIDERS = ("auto", "cpu", "cuda")

Record = tuple[str, ...]  # one sentence, or two for a pair


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class SpecialTokens:
    cls_id: int | None
    sep_id: int | None
    mask_id: int | None
    pad_id: int
    mask_token: str | None

    @classmethod
    def from_json(cls, data: Any, where: Path) -> SpecialTokens:
        if not isinstance(data, dict):
            raise FormatError("field 'special_tokens' must be an object", where)

        def opt_int(key: str) -> int | None:
            v = data.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise FormatError(f"field 'special_tokens.{key}' must be a token id or null", where)
            return v

        pad = opt_int("pad_id")
        if pad is None:
            raise FormatError("field 'special_tokens.pad_id' is required", where)
        mt = data.get("mask_token")
        if mt is not None and not isinstance(mt, str):
            raise FormatError("field 'special_tokens.mask_token' must be a string", where)
        return cls(opt_int("cls_id"), opt_int("sep_id"), opt_int("mask_id"), pad, mt)


@dataclass
class BundleManifest:
    """The parsed, validated ``manifest.json`` of a bundle."""

    files: dict[str, str]
    targets: list[str]
    hidden_size: int
    embedding_size: int
    max_positions: int
    special_tokens: SpecialTokens
    mask_template: str | None
    prompt_length: int
    outputs: list[str]
    model: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, where: Path) -> BundleManifest:
        def bad(msg: str) -> FormatError:
            return FormatError(f"invalid bundle manifest: {msg}", where)

        check_header(data, FORMAT, VERSION, bad)
        files = data.get("files")
        if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v.startswith("sha256:")
            for k, v in files.items()
        ):
            raise bad("field 'files' must map file names to 'sha256:<hex>' digests")
        for req in (ONNX_FILE, EMBEDDINGS_FILE, TOKENIZER_FILE, PVSET_FILE):
            if req not in files:
                raise bad(f"field 'files' does not list {req}")
        for name in files:
            if "/" in name or "\\" in name or name.startswith(".") or name == MANIFEST:
                raise bad(f"field 'files' lists {name!r}: only plain file names of the bundle")
        targets = data.get("targets")
        if not isinstance(targets, list) or not targets or any(t not in TARGETS for t in targets):
            raise bad(f"field 'targets' must be a non-empty list of {TARGETS}")

        def pos_int(key: str, allow_zero: bool = False) -> int:
            v = data.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
                raise bad(
                    f"field {key!r} must be a {'non-negative' if allow_zero else 'positive'} integer"
                )
            return v

        outputs = data.get("outputs")
        if not isinstance(outputs, list) or "last_hidden_state" not in outputs:
            raise bad("field 'outputs' must list 'last_hidden_state'")
        if "pooler" in targets and "pooler_output" not in outputs:
            raise bad("a PV targets 'pooler' but field 'outputs' has no 'pooler_output'")
        prompt_length = pos_int("prompt_length", allow_zero=True)
        if prompt_length and PROMPT_FILE not in files:
            raise bad(f"field 'prompt_length' is {prompt_length} but 'files' has no {PROMPT_FILE}")
        tmpl = data.get("mask_template")
        special = SpecialTokens.from_json(data.get("special_tokens"), where)
        if "mask" in targets:
            if not isinstance(tmpl, str) or "{sentence}" not in tmpl:
                raise bad("target 'mask' needs field 'mask_template' with '{sentence}'")
            if special.mask_id is None or special.mask_token is None:
                raise bad("target 'mask' needs 'special_tokens.mask_id' and 'mask_token'")
        return cls(
            files=dict(files),
            targets=list(targets),
            hidden_size=pos_int("hidden_size"),
            embedding_size=pos_int("embedding_size"),
            max_positions=pos_int("max_positions"),
            special_tokens=special,
            mask_template=tmpl if isinstance(tmpl, str) else None,
            prompt_length=prompt_length,
            outputs=[str(o) for o in outputs],
            model=dict(data.get("model") or {}),
            validation=dict(data.get("validation") or {}),
            raw=data,
        )


def verify_files(root: Path, files: dict[str, str]) -> None:
    """Check every listed file's SHA-256; raise FormatError naming the first one that differs."""
    for name, digest in sorted(files.items()):
        p = root / name
        if not p.is_file():
            raise FormatError(f"bundle file {name} listed in manifest.json is missing", root)
        got = sha256_of(p)
        if got != digest:
            raise FormatError(
                f"bundle file {name} does not match manifest.json (sha256 {got[7:19]}... "
                f"!= {digest[7:19]}...): the bundle was modified or damaged",
                root,
            )


@dataclass
class Encoded:
    """A batch ready for the backbone (before padding to a rectangle)."""

    ids: list[list[int]]
    special: list[list[int]]  # 1 where the token is special
    target_pos: list[int]  # mask / cls position (in the token sequence, before the prompt)


@dataclass
class MonitorResult:
    """The monitor's decision on one record."""

    flagged: bool
    pv: int | None  # id of the best-matching PV (None when the record has no target row)
    match_rate: float  # best match count / d
    target: str
    token: int | None = None  # for target 'tokens': index of the best token (among ordinary tokens)


def _is_punct(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def word_key(word: str) -> str:
    """The purge's identity of a whitespace word: case-folded with leading and trailing
    punctuation stripped ("CFO." and "cfo" are one word); a word of punctuation only is itself."""
    a, b = 0, len(word)
    while a < b and _is_punct(word[a]):
        a += 1
    while b > a and _is_punct(word[b - 1]):
        b -= 1
    return word[a:b].casefold() or word


@dataclass
class PurgeResult:
    """The outcome of the sliding-window purge of one flagged record."""

    status: str  # "purged" or "unpurgeable"
    sentences: list[str]  # the purged record (the original when unpurgeable)
    removed: tuple[str, ...] = ()
    span: tuple[int, int, int] | None = None  # (sentence, start word, end word) of the window
    window: int | None = None
    forward_passes: int = 0
    candidates: int = 0
    after: MonitorResult | None = None


class Bundle:
    """A verified bundle on disk. Build with :meth:`load`."""

    def __init__(
        self,
        path: Path,
        manifest: BundleManifest,
        pvset: PVSet,
        embeddings: np.ndarray,
        prompt: np.ndarray | None,
        tokenizer: Any,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.pvset = pvset
        self.embeddings = embeddings
        self.prompt = prompt
        self.tokenizer = tokenizer

    @property
    def digest(self) -> str:
        return sha256_of(self.path / MANIFEST)

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> Bundle:
        root = Path(path)
        if not root.is_dir():
            raise InputError("bundle folder not found", root)
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise FormatError("no manifest.json: not an lmsan bundle", root)
        try:
            data = json.loads(mpath.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"manifest is not valid JSON ({exc})", mpath) from None
        man = BundleManifest.from_json(data, mpath)
        if verify:
            verify_files(root, man.files)
        pvset = PVSet.load(root / PVSET_FILE)
        if pvset.hidden_size != man.hidden_size:
            raise FormatError(
                f"pvset.json hidden_size {pvset.hidden_size} != manifest hidden_size {man.hidden_size}",
                root,
            )
        if sorted(pvset.targets()) != sorted(man.targets):
            raise FormatError(
                f"pvset.json targets {pvset.targets()} != manifest targets {man.targets}", root
            )
        try:
            emb = np.load(root / EMBEDDINGS_FILE, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise FormatError(f"cannot read {EMBEDDINGS_FILE} ({exc})", root) from None
        if emb.ndim != 2 or emb.dtype != np.float32 or emb.shape[1] != man.embedding_size:
            raise FormatError(
                f"{EMBEDDINGS_FILE} must be float32 [vocab, {man.embedding_size}], got "
                f"{emb.dtype} {list(emb.shape)}",
                root,
            )
        prompt = None
        if man.prompt_length:
            prompt = np.load(root / PROMPT_FILE, allow_pickle=False)
            if (
                prompt.shape != (man.prompt_length, man.embedding_size)
                or prompt.dtype != np.float32
            ):
                raise FormatError(
                    f"{PROMPT_FILE} must be float32 [{man.prompt_length}, {man.embedding_size}]",
                    root,
                )
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(root / TOKENIZER_FILE))
        except Exception as exc:  # noqa: BLE001 - any parse error is a format error
            raise FormatError(f"cannot read {TOKENIZER_FILE} ({exc})", root) from None
        tok.no_truncation()
        tok.no_padding()
        st = man.special_tokens
        for key in ("cls_id", "sep_id", "mask_id", "pad_id"):
            v = getattr(st, key)
            if v is not None and v >= emb.shape[0]:
                raise FormatError(f"special_tokens.{key} {v} is outside the vocabulary", root)
        return cls(root, man, pvset, emb, prompt, tok)


def check_per_pv_thresholds(value: Any, where: str = "per-PV thresholds") -> dict[int, float]:
    """Validate per-PV match thresholds: a mapping PV id -> T_match in (0, 1] (JSON keys may be
    the ids as strings)."""
    if not isinstance(value, dict) or not value:
        raise UsageError(f"{where}: expected a non-empty mapping of PV id to a rate in (0, 1]")
    out: dict[int, float] = {}
    for k, v in value.items():
        try:
            pid = int(k)
        except (TypeError, ValueError):
            raise UsageError(f"{where}: PV id {k!r} is not an integer") from None
        t = check_match_threshold(v)
        if t is None:
            raise UsageError(f"{where}: PV {pid} has no threshold")
        out[pid] = t
    return out


def check_match_threshold(value: float | None) -> float | None:
    """Validate a per-deployment T_match (``--t-match``): None, or a number in (0, 1]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise UsageError(f"--t-match {value!r}: expected a number in (0, 1]")
    t = float(value)
    if not 0.0 < t <= 1.0:  # also refuses NaN
        raise UsageError(f"--t-match {value!r}: the match threshold must be in (0, 1]")
    return t


def _ort_providers(provider: str) -> list[str]:
    import onnxruntime as ort

    avail = ort.get_available_providers()
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        if "CUDAExecutionProvider" not in avail:
            raise UsageError(
                "--provider cuda: onnxruntime has no CUDAExecutionProvider "
                f"(available: {', '.join(avail)}); install onnxruntime-gpu"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if provider == "auto":
        if "CUDAExecutionProvider" in avail:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]
    raise UsageError(f"--provider {provider!r}: expected one of {', '.join(PROVIDERS)}")


class Screener:
    """ORT session + monitor + purge over one bundle.

    ``provider``: ``auto`` uses CUDA only when onnxruntime lists it AND the created session
    really runs on it (``get_providers()[0]``), else CPU; ``cuda`` fails unless CUDA is active.
    ``threads``: ORT intra-op threads (0 = ORT's default, all cores).
    ``match_threshold``: the sign-match rate T_match that flags a record, for this deployment
    (None: the PV set's ``match_threshold``; see :mod:`lmsan.auditor.threshold` for choosing one
    on clean data of the deployment).
    ``per_pv_thresholds``: PV id -> T_match for this deployment (``lmsan threshold --per-pv``);
    PVs not named keep the threshold above. A record is flagged when some PV reaches its own.
    """

    def __init__(
        self,
        bundle: Bundle,
        provider: str = "auto",
        threads: int = 0,
        batch_size: int = 32,
        max_length: int | None = None,
        match_threshold: float | None = None,
        per_pv_thresholds: dict[int, float] | None = None,
    ) -> None:
        import onnxruntime as ort

        t_match = check_match_threshold(match_threshold)
        per_pv = None if per_pv_thresholds is None else check_per_pv_thresholds(per_pv_thresholds)
        if batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if threads < 0:
            raise UsageError("--threads must be 0 (all cores) or more")
        self.bundle = bundle
        man = bundle.manifest
        limit = man.max_positions
        if max_length is None:
            max_length = limit
        if max_length < 2:
            raise UsageError("--max-length must be at least 2")
        if max_length > limit:
            raise UsageError(f"--max-length {max_length} exceeds the model's {limit} positions")
        self.max_length = max_length
        self.batch_size = batch_size
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # Every batch has its own (batch, length) shape: ORT's arena and per-shape memory
        # patterns would keep growing over a long scan. Plain allocations keep memory flat.
        opts.enable_cpu_mem_arena = False
        opts.enable_mem_pattern = False
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        provs = _ort_providers(provider)
        self.session = ort.InferenceSession(
            str(bundle.path / ONNX_FILE), sess_options=opts, providers=provs
        )
        active = self.session.get_providers()
        if provider in ("auto", "cuda") and "CUDAExecutionProvider" in provs:
            if not active or active[0] != "CUDAExecutionProvider":
                if provider == "cuda":
                    raise UsageError(
                        "--provider cuda: the ONNX Runtime session did not activate CUDA "
                        f"(active: {', '.join(active)})"
                    )
                # CUDA was listed but could not start (no driver/device): run on CPU, and say so
                # in `provider` (the summary reports it).
                self.session = ort.InferenceSession(
                    str(bundle.path / ONNX_FILE),
                    sess_options=opts,
                    providers=["CPUExecutionProvider"],
                )
                active = self.session.get_providers()
        self.provider = active[0]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.pvs_by_target: dict[str, tuple[np.ndarray, list[int]]] = {}
        for t in man.targets:
            pvs = bundle.pvset.for_target(t)
            packed = mon.pack_signs(np.stack([p.values for p in pvs]).astype(np.float32))
            self.pvs_by_target[t] = (packed, [p.id for p in pvs])
        self.d = man.hidden_size
        # the rate in force and whether it came from the PV set or the caller
        self.match_threshold = bundle.pvset.match_threshold if t_match is None else t_match
        self.match_threshold_source = "pvset" if t_match is None else "option"
        self.threshold = mon.threshold_count(self.d, self.match_threshold)
        known = {p.id for p in bundle.pvset.pvs}
        if per_pv is not None and not set(per_pv) <= known:
            raise UsageError(
                f"per-PV thresholds name PV ids {sorted(set(per_pv) - known)} that the bundle's "
                f"PV set does not have (its ids: {sorted(known)})"
            )
        self.per_pv_thresholds = per_pv
        if per_pv is not None:
            self.match_threshold_source = "per-pv"
        # per target: the threshold count of each of its PVs (in the order of pvs_by_target)
        self.thresholds_by_target: dict[str, np.ndarray] = {
            t: np.asarray(
                [
                    mon.threshold_count(self.d, per_pv[i])
                    if per_pv is not None and i in per_pv
                    else self.threshold
                    for i in ids
                ],
                dtype=np.int64,
            )
            for t, (_, ids) in self.pvs_by_target.items()
        }
        self.forward_passes = 0
        self.implementation = mon.implementation()

    # ------------------------------------------------------------------ encoding

    def forms(self) -> list[str]:
        """Input forms needed by the targets: 'plain' and/or 'template'."""
        t = self.bundle.manifest.targets
        out = []
        if any(x in PLAIN_TARGETS for x in t):
            out.append("plain")
        if "mask" in t:
            out.append("template")
        return out

    def _apply_template(self, rec: Record, template: str | None = None) -> Record:
        man = self.bundle.manifest
        tmpl = template if template is not None else man.mask_template
        assert tmpl is not None and man.special_tokens.mask_token is not None
        last = tmpl.format(sentence=rec[-1], mask_token=man.special_tokens.mask_token)
        return (*rec[:-1], last)

    def encode(
        self, records: Sequence[Record], form: str = "plain", template: str | None = None
    ) -> Encoded:
        """Token ids, special-token masks and target positions of ``records`` in ``form``
        ('plain', or 'template': the mask template on the last text; ``template`` overrides the
        manifest's, e.g. for a task head on [MASK] under a PV set without mask PVs)."""
        tok = self.bundle.tokenizer
        if form == "template":
            records = [self._apply_template(r, template) for r in records]
        inputs: list[Any] = [r[0] if len(r) == 1 else (r[0], r[1]) for r in records]
        encs = tok.encode_batch(inputs, add_special_tokens=True)
        ids = [e.ids for e in encs]
        special = [e.special_tokens_mask for e in encs]
        st = self.bundle.manifest.special_tokens
        pos: list[int] = []
        for e_ids, sp in zip(ids, special, strict=True):
            if form == "template":
                mids = [i for i, t in enumerate(e_ids) if t == st.mask_id]
                pos.append(mids[-1] if mids else -1)
            else:
                first = next((i for i, s in enumerate(sp) if s), 0)
                pos.append(first)
        return Encoded(ids, special, pos)

    def lengths(self, enc: Encoded) -> list[int]:
        return [len(i) + self.bundle.manifest.prompt_length for i in enc.ids]

    def _insert_at(self, sp: list[int]) -> int:
        return 1 if sp and sp[0] else 0

    def build_inputs(self, enc: Encoded, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """``inputs_embeds`` float32 [B, L, emb] and ``attention_mask`` int64 [B, L] for ``rows``
        (embedding lookup, soft prompt inserted, right padding)."""
        emb = self.bundle.embeddings
        prompt = self.bundle.prompt
        lp = 0 if prompt is None else prompt.shape[0]
        seqs = [enc.ids[r] for r in rows]
        L = max(len(s) for s in seqs) + lp
        B = len(seqs)
        st = self.bundle.manifest.special_tokens
        ids = np.full((B, L - lp), st.pad_id, dtype=np.int64)
        mask = np.zeros((B, L), dtype=np.int64)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = s
            mask[b, : len(s) + lp] = 1
        tok_emb = np.asarray(emb[ids.reshape(-1)]).reshape(B, L - lp, -1)
        if prompt is None:
            return np.ascontiguousarray(tok_emb, dtype=np.float32), mask
        x = np.empty((B, L, tok_emb.shape[2]), dtype=np.float32)
        for b, r in enumerate(rows):
            k = self._insert_at(enc.special[r])
            x[b, :k] = tok_emb[b, :k]
            x[b, k : k + lp] = prompt
            x[b, k + lp :] = tok_emb[b, k:]
        return x, mask

    def run(self, x: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """One ORT forward pass."""
        outs = self.session.run(self.output_names, {"inputs_embeds": x, "attention_mask": mask})
        self.forward_passes += 1
        return dict(zip(self.output_names, outs, strict=True))

    def forward(self, enc: Encoded, rows: Sequence[int]) -> dict[str, np.ndarray]:
        """One ORT run over the encoded records ``rows`` (right-padded); returns the outputs."""
        return self.run(*self.build_inputs(enc, rows))

    def target_rows(
        self, enc: Encoded, rows: Sequence[int], outs: dict[str, np.ndarray], target: str
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Target output rows [m, d], the record (batch index) of each row, and token index."""
        lp = self.bundle.manifest.prompt_length
        hs = outs["last_hidden_state"]
        if target == "pooler":
            n = len(rows)
            return outs["pooler_output"], np.arange(n), np.zeros(n, dtype=np.int64)
        if target in ("cls", "mask"):
            pos = []
            for r in rows:
                p = enc.target_pos[r]
                if p < 0:
                    p = 0  # template lost its mask token: cannot happen with the tokenizer's own
                pos.append(p + lp if (lp and p >= self._insert_at(enc.special[r])) else p)
            idx = np.arange(len(rows))
            return hs[idx, np.asarray(pos)], idx, np.zeros(len(rows), dtype=np.int64)
        # tokens: every ordinary token
        bi: list[int] = []
        ti: list[int] = []
        tok_idx: list[int] = []
        for b, r in enumerate(rows):
            sp = enc.special[r]
            k = self._insert_at(sp)
            j = 0
            for i, s in enumerate(sp):
                if not s:
                    bi.append(b)
                    ti.append(i + lp if (lp and i >= k) else i)
                    tok_idx.append(j)
                    j += 1
        if not bi:
            return (
                np.zeros((0, hs.shape[2]), np.float32),
                np.zeros(0, np.int64),
                np.zeros(0, np.int64),
            )
        return hs[np.asarray(bi), np.asarray(ti)], np.asarray(bi), np.asarray(tok_idx)

    def decide(
        self, per_target: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], n: int
    ) -> list[MonitorResult]:
        """Combine target rows into one result per record: flagged when any row reaches a PV's
        threshold; the reported PV is the one with the largest margin (count - its threshold)
        over targets and rows, which with one threshold for all PVs is the best match."""
        best_count = np.full(n, -1, dtype=np.int64)
        best_margin = np.full(n, np.iinfo(np.int64).min, dtype=np.int64)
        best_pv: list[int | None] = [None] * n
        best_target = [self.bundle.manifest.targets[0]] * n
        best_tok: list[int | None] = [None] * n
        flagged = np.zeros(n, dtype=bool)
        for target, (xs, rec, tok) in per_target.items():
            if xs.shape[0] == 0:
                continue
            packed, ids = self.pvs_by_target[target]
            thr = self.thresholds_by_target[target]
            idx, cnt, flg = mon.best_match(
                np.ascontiguousarray(xs, dtype=np.float32), packed, self.d, thr
            )
            cnt = cnt.astype(np.int64)
            margin = cnt - np.where(idx >= 0, thr[np.maximum(idx, 0)], 0)
            if xs.shape[0] == n and np.array_equal(rec, np.arange(n)):
                better = margin > best_margin  # one row per record: vectorised
                rows_sel = np.nonzero(better)[0]
                best_count[better] = cnt[better]
                best_margin[better] = margin[better]
                for b in rows_sel.tolist():
                    best_pv[b] = ids[int(idx[b])] if idx[b] >= 0 else None
                    best_target[b] = target
                    best_tok[b] = int(tok[b]) if target == "tokens" else None
                flagged |= flg.astype(bool)
                continue
            for row in range(xs.shape[0]):
                b = int(rec[row])
                c = int(cnt[row])
                if int(margin[row]) > best_margin[b]:
                    best_count[b] = c
                    best_margin[b] = int(margin[row])
                    best_pv[b] = ids[int(idx[row])] if idx[row] >= 0 else None
                    best_target[b] = target
                    best_tok[b] = int(tok[row]) if target == "tokens" else None
                if flg[row]:
                    flagged[b] = True
        return [
            MonitorResult(
                flagged=bool(flagged[b]),
                pv=best_pv[b],
                match_rate=max(0, int(best_count[b])) / self.d,
                target=best_target[b],
                token=best_tok[b],
            )
            for b in range(n)
        ]

    # ------------------------------------------------------------------ monitor

    def pv_columns(self) -> list[int]:
        """The PV ids of the columns of a match table (:meth:`monitor_encoded`'s ``table``)."""
        return [i for t in self.bundle.manifest.targets for i in self.pvs_by_target[t][1]]

    def _table_rows(
        self, per_target: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], n: int
    ) -> np.ndarray:
        """Each record's best match count with each PV (over the rows of that PV's target):
        int64 [n, len(pv_columns())], -1 where the record has no row of the target."""
        out = np.full((n, len(self.pv_columns())), -1, dtype=np.int64)
        col = 0
        for t in self.bundle.manifest.targets:
            packed, ids = self.pvs_by_target[t]
            xs, rec, _ = per_target.get(t, (np.zeros((0, self.d), np.float32), None, None))
            if xs.shape[0]:
                counts = mon.match_counts(
                    mon.pack_signs(np.ascontiguousarray(xs, dtype=np.float32)), packed, self.d
                ).astype(np.int64)
                # a view of out's columns: ufunc.at writes through it
                np.maximum.at(out[:, col : col + len(ids)], np.asarray(rec), counts)
            col += len(ids)
        return out

    def monitor_encoded(
        self,
        encs: dict[str, Encoded],
        order: Sequence[int] | None = None,
        table: np.ndarray | None = None,
    ) -> list[MonitorResult]:
        """Monitor pre-encoded records (one Encoded per input form), batching ``order``.

        ``table``: an int64 [n, len(pv_columns())] array to fill with each record's best match
        count per PV (for per-PV thresholds, :func:`lmsan.auditor.threshold.choose_per_pv`)."""
        n = len(next(iter(encs.values())).ids)
        order = list(range(n)) if order is None else list(order)
        results: list[MonitorResult | None] = [None] * n
        for s in range(0, len(order), self.batch_size):
            rows = order[s : s + self.batch_size]
            per_target: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
            for form, enc in encs.items():
                outs = self.forward(enc, rows)
                for t in self.bundle.manifest.targets:
                    if (t == "mask") == (form == "template"):
                        per_target[t] = self.target_rows(enc, rows, outs, t)
            for r, res in zip(rows, self.decide(per_target, len(rows)), strict=True):
                results[r] = res
            if table is not None:
                table[np.asarray(rows)] = self._table_rows(per_target, len(rows))
        return [r for r in results if r is not None]

    def encode_all(self, records: Sequence[Record]) -> dict[str, Encoded]:
        return {form: self.encode(records, form) for form in self.forms()}

    def too_long(self, encs: dict[str, Encoded]) -> list[int | None]:
        """Per record: its longest token count when over --max-length, else None."""
        n = len(next(iter(encs.values())).ids)
        out: list[int | None] = [None] * n
        for enc in encs.values():
            for i, L in enumerate(self.lengths(enc)):
                if L > self.max_length:
                    out[i] = max(L, out[i] or 0)
        return out

    def monitor(
        self, records: Sequence[Record | str], table: np.ndarray | None = None
    ) -> list[MonitorResult]:
        """Monitor texts or pairs, batched by length; results in input order (``table``: see
        :meth:`monitor_encoded`).

        Raises InputError for a record longer than ``max_length`` tokens.
        """
        recs = [(r,) if isinstance(r, str) else tuple(r) for r in records]
        if not recs:
            return []
        encs = self.encode_all(recs)
        for i, L in enumerate(self.too_long(encs)):
            if L is not None:
                raise InputError(f"record {i}: {L} tokens exceed the max length {self.max_length}")
        key = next(iter(encs.values()))
        order = sorted(range(len(recs)), key=lambda i: len(key.ids[i]))
        return self.monitor_encoded(encs, order, table)

    # ------------------------------------------------------------------ purge

    def purge(self, record: Record | str, max_window: int = 5, batched: bool = True) -> PurgeResult:
        """Sliding-window trigger removal for one (flagged) record.

        For w = 1..max_window: every candidate of window w (all occurrences of the window's
        words removed from every sentence; ``monitor.purge_candidates`` on the words' keys,
        :func:`word_key`: "CFO." is an occurrence of "cfo") is monitored, all of
        them in one batched forward pass per input form (``batched=False`` runs one forward pass
        per candidate: the baseline of the benchmark); the first candidate in span order that
        comes back clean is the purged record. A candidate that would leave a sentence with no
        word is skipped (removing everything is not a purge). Words are whitespace-split, so the
        purged text is the kept words joined by single spaces. No clean candidate up to
        ``max_window``: ``unpurgeable``.
        """
        rec = (record,) if isinstance(record, str) else tuple(record)
        words = [s.split() for s in rec]
        # occurrences are matched on a word's key (case-folded, outer punctuation stripped): a
        # trigger written twice as "cf" and "cf." would otherwise survive the removal of "cf"
        keys = [[word_key(x) for x in s] for s in words]
        passes0 = self.forward_passes
        ncand = 0
        for w in range(1, max_window + 1):
            cands = []
            for c in mon.purge_candidates(keys, w):
                gone = set(c.removed)
                kept = [[x for x, k in zip(ws, ks, strict=True) if k not in gone]
                        for ws, ks in zip(words, keys, strict=True)]
                if all(len(s) > 0 for s in kept):
                    span = words[c.sentence][c.start : c.end]
                    cands.append(mon.PurgeCandidate(c.sentence, c.start, c.end,
                                                    tuple(dict.fromkeys(span)), kept))
            if not cands:
                continue
            ncand += len(cands)
            texts = [tuple(" ".join(s) for s in c.purged) for c in cands]
            encs = self.encode_all(texts)
            too_long = self.too_long(encs)
            if batched:
                res = self._monitor_candidates(encs)
            else:
                res = []
                for i in range(len(cands)):
                    sub = {
                        f: Encoded([e.ids[i]], [e.special[i]], [e.target_pos[i]])
                        for f, e in encs.items()
                    }
                    res.extend(self._monitor_candidates(sub))
            for c, t, r, tl in zip(cands, texts, res, too_long, strict=True):
                if not r.flagged and tl is None:
                    return PurgeResult(
                        status="purged",
                        sentences=list(t),
                        removed=c.removed,
                        span=(c.sentence, c.start, c.end),
                        window=w,
                        forward_passes=self.forward_passes - passes0,
                        candidates=ncand,
                        after=r,
                    )
        return PurgeResult(
            status="unpurgeable",
            sentences=list(rec),
            forward_passes=self.forward_passes - passes0,
            candidates=ncand,
        )

    def _monitor_candidates(self, encs: dict[str, Encoded]) -> list[MonitorResult]:
        """All candidates in one forward pass per form (no --batch-size split: the design
        evaluates one window length at once; candidates are as many as the record's words)."""
        n = len(next(iter(encs.values())).ids)
        per_target: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        rows = list(range(n))
        for form, enc in encs.items():
            outs = self.forward(enc, rows)
            for t in self.bundle.manifest.targets:
                if (t == "mask") == (form == "template"):
                    per_target[t] = self.target_rows(enc, rows, outs, t)
        return self.decide(per_target, n)


def open_bundle(
    path: str | Path,
    provider: str = "auto",
    threads: int = 0,
    batch_size: int = 32,
    max_length: int | None = None,
    match_threshold: float | None = None,
    per_pv_thresholds: dict[int, float] | None = None,
) -> Screener:
    """Load and verify a bundle and open its ORT session (``match_threshold``: the deployment's
    T_match; None keeps the PV set's; ``per_pv_thresholds``: PV id -> T_match)."""
    check_match_threshold(match_threshold)  # a usage error before the bundle is read
    if per_pv_thresholds is not None:
        check_per_pv_thresholds(per_pv_thresholds)
    return Screener(Bundle.load(path), provider, threads, batch_size, max_length, match_threshold,
                    per_pv_thresholds)

"""PV mining (Algorithm 1 of the paper, as specified in docs/how-it-works.md).

One `Miner` holds a frozen encoder, a clean corpus and the clean target outputs of that corpus
(computed once: the "auxiliary model" never changes). `Miner.run_seed(s)` is one fuzz loop: a
7-vector soft prompt initialised from vocabulary rows (70*s + 10*i) mod V is inserted at a random
word position of every sentence (into `inputs_embeds`, so position/segment embeddings are added as
usual) and trained with Adam on

    L = lambda_D * L_D + lambda_div * L_div + lambda_P * L_P

Scale. The losses are the paper's, on raw outputs (`loss_scale="raw"`; "standardized" divides the
outputs by the clean spread `s` first). The diversity loss is the paper's entropy
(`div_loss="entropy"`) or `"log_concentration"`, log(batch variance / displacement): a scale-free
form of Observation II that, on POR-backdoored all-MiniLM-L6-v2, leads mining to the injected PV
where the entropy loss converges to an adversarial direction that moves outputs further but does
not collapse them (bench/results/calibration.md). Presets choose it per family.

Every decision reads scale-free figures, so one threshold means the same at any output scale:
T_L compares MSE(F, F_clean) / mean(F_clean^2) (the displacement relative to the size of the
clean outputs), and the collapse rule reads the concentration. The paper's entropy on raw
outputs and the raw distance are measured and reported for every candidate too.

Which candidates become PVs is decided in `filtering` (section IV-C).

torch is imported here; this module is only used by `lmsan audit`/`calibrate`, never by scan.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from .corpus import Corpus
from .filtering import (
    CLEAN_MATCH_LIMIT,
    NEAR_MISS,
    PVFilter,
    TargetStats,
    is_candidate,
    no_candidate_rule,
    prompt_in_range,
)
from .hints import nearest_tokens
from .lockstep import SeedState, Training, run_rows
from .modelio import LoadedModel
from .pvset import TARGETS

_PLACEHOLDER = re.compile(r"^(\[unused\d+\]|<unused\d+>|\[UNK\]|<unk>)$")


@dataclass
class MiningConfig:
    """Every hyper-parameter of the method (docs/how-it-works.md), with its default."""

    soft_prompt_len: int = 7
    batch_size: int = 32
    epochs: int = 4
    abort_epoch: int = 2  # abandon the seed if no candidate after this many epochs
    lr0: float = 2e-4
    lr_boost: float = 100.0  # start at lr_boost * lr0 until a gradient entry exceeds t_grad
    t_grad: float = 5e-3
    lambda_d: float = 1.0
    lambda_div: float = 1.0
    lambda_p: float = 0.5
    # candidate when the epoch's mean distance MSE(F, F_clean) / mean(F_clean^2) exceeds this
    t_l: float = 0.5
    t_collapse: float = 0.005  # accept when the concentration is below this (rule "collapse")
    # per-target overrides of t_l / t_collapse, e.g. {"pooler": {"t_collapse": 0.0002}}: each
    # output (cls, pooler, tokens, mask) has its own clean statistics. A per-target "t_far" (set
    # only by calibration, where backdoored shadows moved >= 10x farther than every clean one)
    # accepts a candidate whose final distance exceeds it even without collapse.
    per_target: dict[str, dict[str, float]] = field(default_factory=dict)
    t_div: float | None = None  # paper rule: raw entropy diversity threshold; None = -ln B + 0.02
    filter_rule: str = "collapse"  # "collapse" or "paper"
    # "raw": the paper's losses on raw outputs; "standardized": losses on outputs divided by the
    # clean spread s. T_L is relative to the clean outputs' mean square in both.
    loss_scale: str = "raw"
    # "entropy": the paper's L_div; "log_concentration": log(batch variance / displacement),
    # a scale-free form of Observation II (the same statistic the collapse filter reads).
    div_loss: str = "entropy"
    range_factor: float = 1.2
    t_match: float = 0.8  # sign agreement at or above this = the same PV
    max_insert: int = 32
    max_length: int = 128
    eval_sentences: int = 256
    # soft prompt initialisation: "stride" = the paper's vocabulary rows 70*seed + ... (in a BERT
    # vocabulary the first seeds all start on near-identical [unused] rows, so they tend to fall
    # into one basin); "vocab" = l_sp ordinary tokens drawn at random per seed (search mode's
    # default: different seeds start from different words and reach different PVs)
    prompt_init: str = "stride"
    # rule 4 (auditor.confirm): a candidate that passes every other rule is kept only when a
    # trigger of a few ordinary tokens drives held-out sentences onto it
    confirm: bool = False
    confirm_min_rate: float = 0.9
    confirm_max_tokens: int = 2  # the longest trigger the search tries
    # rule 4a (filtering.CLEAN_MATCH_LIMIT), and rule 4's limit on where a trigger lands. Presets
    # may set it per target (the tiny randomly initialised encoders' planted PVs reach 2.7%: their
    # presets set 6%); self-calibration derives it
    confirm_max_clean_match: float = CLEAN_MATCH_LIMIT
    # decide a seed at the check epoch (`abort_epoch`) when one of its candidates already passes
    # rules 1-3 there: its figures and the filter's decision (rule 4 included) are those of that
    # epoch and it trains no further. A collapsed backdoor PV is usually reached by then, so a
    # flag costs half the epochs; a seed whose candidates do not pass yet trains on as usual
    decide_early: bool = False

    def t_l_for(self, target: str) -> float:
        return float(self.per_target.get(target, {}).get("t_l", self.t_l))

    def t_collapse_for(self, target: str) -> float:
        return float(self.per_target.get(target, {}).get("t_collapse", self.t_collapse))

    def clean_match_limit_for(self, target: str) -> float:
        return float(self.per_target.get(target, {}).get("confirm_max_clean_match",
                                                         self.confirm_max_clean_match))

    def t_far_for(self, target: str) -> float | None:
        v = self.per_target.get(target, {}).get("t_far")
        return None if v is None else float(v)

    def resolved_t_div(self) -> float:
        return self.t_div if self.t_div is not None else -math.log(self.batch_size) + 0.02

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["t_div"] = self.resolved_t_div()
        return d


@dataclass
class SeedResult:
    seed: int
    seconds: float
    epochs_run: int
    aborted: bool
    steps: int
    lr_dropped_at: int | None
    prompt_in_range: bool
    prompt_min: float
    prompt_max: float
    trigger_hint: list[list[str]]
    targets: list[TargetStats] = field(default_factory=list)
    prompt: list[list[float]] | None = None
    decided_early: bool = False  # decided at the check epoch (MiningConfig.decide_early)

    def accepted(self) -> list[TargetStats]:
        return [t for t in self.targets if t.accepted]


# rows per forward call: rows sorted by length and run this many at a time waste little padding
CHUNK_ROWS = 16

ProgressFn = Callable[[dict[str, Any]], None]

# the figures `Miner.evaluate_all` measures per target (the fields of TargetStats it fills)
_FIGURES = ("distance_rel", "distance_raw", "distance_norm", "spread_ratio", "concentration",
            "sign_consensus", "entropy_raw", "entropy_std")


def _entropy_div(f: torch.Tensor) -> torch.Tensor:
    """L_div = -H: softmax over the batch for each unit, entropy summed over the batch and
    averaged over units. Minimum -ln B (all rows identical)."""
    p = torch.softmax(f.T, dim=-1)
    h = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)
    return -h.mean()


class Miner:
    """Mines PVs from one frozen encoder on one clean corpus."""

    clean_batch = 64  # sentences per forward pass of the clean reference (computed once)

    def __init__(
        self,
        lm: LoadedModel,
        corpus: Corpus,
        targets: list[str],
        cfg: MiningConfig,
        device: str = "cpu",
        base_seed: int = 0,
        chunk_rows: int | None = CHUNK_ROWS,
    ) -> None:
        self.lm = lm
        self.chunk_rows = chunk_rows  # rows per forward call (None: one call per seed's batch)
        self.cfg = cfg
        self.device = device
        self.base_seed = base_seed
        self.targets = list(targets)
        for t in self.targets:
            if t not in TARGETS:
                raise ValueError(f"unknown target {t!r}")
        # With "mask" among the targets every sentence gets the neutral template
        # f"{sentence} {mask_token}"; the other targets then read the same forward pass.
        tok = lm.tokenizer
        self.model = lm.model
        self.emb = self.model.get_input_embeddings()
        w = self.emb.weight.detach()
        self.vocab_size = int(w.shape[0])
        self.emb_min = float(w.min())
        self.emb_max = float(w.max())
        self.special_ids = set(int(i) for i in tok.all_special_ids)
        self.cls_id = tok.cls_token_id
        self.mask_id = tok.mask_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        texts = corpus.sentences
        if "mask" in self.targets:
            if tok.mask_token is None:
                raise ValueError("the tokenizer has no mask token")
            texts = [f"{s} {tok.mask_token}" for s in texts]
        enc = tok(texts, truncation=True, max_length=cfg.max_length, add_special_tokens=True)
        self.ids: list[list[int]] = [list(x) for x in enc["input_ids"]]
        if "mask" in self.targets:  # truncation may have cut the mask token: drop those rows
            self.ids = [x for x in self.ids if self.mask_id in x]
        self.ids = [x for x in self.ids if self._ordinary_span(x)[1] > self._ordinary_span(x)[0]]
        if len(self.ids) < cfg.batch_size:
            raise ValueError(
                f"the corpus has {len(self.ids)} usable sentences, fewer than one batch "
                f"({cfg.batch_size})"
            )
        self.n = len(self.ids)
        self.clean: dict[str, list[torch.Tensor]] = {}
        self.scale: dict[str, float] = {}
        self.msq: dict[str, float] = {}  # mean square of the clean target outputs
        self._compute_clean()
        rng = np.random.default_rng([base_seed, 7919])
        self.eval_idx = rng.permutation(self.n)[: min(cfg.eval_sentences, self.n)]
        self.eval_idx = self.eval_idx[: (len(self.eval_idx) // cfg.batch_size) * cfg.batch_size]
        self.found: dict[str, list[torch.Tensor]] = {t: [] for t in self.targets}  # path loss
        self._ordinary: np.ndarray | None = None  # ordinary vocabulary ids (prompt_init vocab)
        self.filter = PVFilter(cfg, self.targets)  # the acceptance rules and the kept PVs
        self._clean_signs: dict[str, np.ndarray] = {}  # per target: signs of every clean output
        self._clean_rows_of: dict[str, np.ndarray] = {}  # per target: each output's sentence

    # ---------------------------------------------------------------- positions
    def _ordinary_span(self, ids: list[int]) -> tuple[int, int]:
        """[a, b): the first and one-past-last ordinary (non-special) token."""
        a = 0
        while a < len(ids) and ids[a] in self.special_ids:
            a += 1
        b = len(ids)
        while b > a and ids[b - 1] in self.special_ids:
            b -= 1
        return a, b

    def _target_pos(self, ids: list[int], target: str) -> int:
        if target == "mask":
            return ids.index(self.mask_id)
        if self.cls_id is not None and self.cls_id in ids:
            return ids.index(self.cls_id)
        return 0

    # ---------------------------------------------------------------- forward
    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        t = max(len(r) for r in rows)
        ids = torch.full((len(rows), t), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), t), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids.to(self.device), mask.to(self.device)

    def _extract(
        self, out: Any, rows: list[list[int]], target: str, pos: list[int] | None, plen: int
    ) -> torch.Tensor:
        """Target outputs: [B, d] for cls/mask/pooler, [sum of ordinary tokens, d] for tokens."""
        hs = out.last_hidden_state
        if target == "pooler":
            return out.pooler_output
        if target == "tokens":
            parts = []
            for i, r in enumerate(rows):
                a, b = self._ordinary_span(r)
                idx = torch.arange(a, b, device=hs.device)
                if pos is not None:
                    idx = idx + plen * (idx >= pos[i])
                parts.append(hs[i, idx])
            return torch.cat(parts, 0)
        sel = []
        for i, r in enumerate(rows):
            p = self._target_pos(r, target)
            if pos is not None and p >= pos[i]:
                p += plen
            sel.append(p)
        return hs[torch.arange(len(rows), device=hs.device), torch.tensor(sel, device=hs.device)]

    @torch.no_grad()
    def _compute_clean(self) -> None:
        order = np.argsort([len(x) for x in self.ids])
        per: dict[str, list[torch.Tensor | None]] = {t: [None] * self.n for t in self.targets}
        bs = self.clean_batch
        for k in range(0, self.n, bs):
            idx = order[k : k + bs]
            rows = [self.ids[i] for i in idx]
            ids, mask = self._pad(rows)
            out = self.model(input_ids=ids, attention_mask=mask)
            for t in self.targets:
                if t == "tokens":
                    for j, i in enumerate(idx):
                        a, b = self._ordinary_span(rows[j])
                        per[t][i] = out.last_hidden_state[j, a:b].detach().cpu()
                else:
                    f = self._extract(out, rows, t, None, 0).detach().cpu()
                    for j, i in enumerate(idx):
                        per[t][i] = f[j]
        for t in self.targets:
            vals = [v for v in per[t] if v is not None]
            self.clean[t] = vals
            allrows = torch.cat([v.reshape(-1, v.shape[-1]) for v in vals], 0)
            var = allrows.var(dim=0, unbiased=True).mean().item()
            self.scale[t] = math.sqrt(max(var, 1e-12))
            self.msq[t] = max(float((allrows.double() ** 2).mean()), 1e-30)

    def _clean_batch(self, idx: np.ndarray, target: str) -> torch.Tensor:
        vals = [self.clean[target][i] for i in idx]
        if target == "tokens":
            return torch.cat(vals, 0).to(self.device)
        return torch.stack(vals).to(self.device)

    def _insert(
        self, rows: list[list[int]], prompt: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Word embeddings with the soft prompt inserted at a random word position per row."""
        ids, mask = self._pad(rows)
        bsz, t = ids.shape
        plen = prompt.shape[0]
        pos = []
        for r in rows:
            a, b = self._ordinary_span(r)
            k = int(rng.integers(0, min(self.cfg.max_insert, b - a) + 1))
            pos.append(a + k)
        with torch.no_grad():
            we = self.emb(ids)
        allv = torch.cat([we, prompt.unsqueeze(0).expand(bsz, plen, -1)], dim=1)
        j = torch.arange(t + plen, device=ids.device).unsqueeze(0).expand(bsz, -1)
        p = torch.tensor(pos, device=ids.device).unsqueeze(1)
        src = torch.where(j < p, j, torch.where(j < p + plen, t + (j - p), j - plen))
        embeds = torch.gather(allv, 1, src.unsqueeze(-1).expand(-1, -1, allv.shape[-1]))
        mask_all = torch.cat([mask, torch.ones((bsz, plen), dtype=mask.dtype, device=mask.device)], 1)
        new_mask = torch.gather(mask_all, 1, src)
        return embeds, new_mask, pos

    def _forward_prompted(
        self, idx: np.ndarray, prompt: torch.Tensor, rng: np.random.Generator
    ) -> dict[str, torch.Tensor]:
        return self._forward_many([(idx, prompt, rng)])[0]

    def _forward_many(
        self, items: Sequence[tuple[np.ndarray, torch.Tensor, np.random.Generator]]
    ) -> list[dict[str, torch.Tensor]]:
        """Target outputs of several prompted batches (one per seed of a pass) from shared
        forward passes: `lockstep.run_rows` regroups their rows by length."""
        embs, masks, meta = [], [], []
        for idx, prompt, rng in items:
            rows = [self.ids[i] for i in idx]
            e, m, pos = self._insert(rows, prompt, rng)
            embs.append(e)
            masks.append(m)
            meta.append((rows, pos, prompt.shape[0]))
        outs = run_rows(self.model, embs, masks, self.chunk_rows)
        return [{t: self._extract(o, rows, t, pos, plen) for t in self.targets}
                for o, (rows, pos, plen) in zip(outs, meta, strict=True)]

    # ---------------------------------------------------------------- one seed
    def init_prompt(self, seed: int) -> torch.Tensor:
        if self.cfg.prompt_init == "vocab":
            ordinary = self._ordinary_vocab()
            rng = np.random.default_rng([self.base_seed, seed, 4099])
            rows = [int(x) for x in rng.choice(ordinary, self.cfg.soft_prompt_len, replace=False)]
        elif self.cfg.prompt_init == "stride":
            rows = [(70 * seed + 10 * i) % self.vocab_size for i in range(self.cfg.soft_prompt_len)]
        else:
            raise ValueError(f"unknown prompt_init {self.cfg.prompt_init!r} (stride or vocab)")
        return self.emb.weight.detach()[rows].clone()

    def _ordinary_vocab(self) -> np.ndarray:
        """Token ids that are neither special nor placeholder ([unusedN], <unusedN>) tokens."""
        if self._ordinary is None:
            toks = self.lm.tokenizer.convert_ids_to_tokens(list(range(self.vocab_size)))
            keep = [i for i, t in enumerate(toks) if i not in self.special_ids and t is not None
                    and not _PLACEHOLDER.match(t)]
            if len(keep) < self.cfg.soft_prompt_len:
                raise ValueError("the vocabulary has too few ordinary tokens for the soft prompt")
            self._ordinary = np.asarray(keep)
        return self._ordinary

    def add_found(self, target: str, pv: Sequence[float]) -> None:
        """Enter a candidate of an earlier seed (a continued audit) into the path loss."""
        self.found[target].append(torch.tensor(list(pv), dtype=torch.float32))

    def run_seed(self, seed: int, progress: ProgressFn | None = None) -> SeedResult:
        """One fuzz loop: train a soft prompt from seed `seed`, then measure and filter the
        candidate it makes on every target."""
        return self.run_seeds([seed], progress)[0]

    def run_seeds(self, seeds: list[int], progress: ProgressFn | None = None) -> list[SeedResult]:
        """Train the soft prompts of `seeds` in lockstep (one pass: their batches share the
        forward passes), then measure and filter them in order. A seed's path loss holds the
        candidates found before it, which a pass cannot know, so the results stop after the
        first seed that made a candidate: the seeds after it must run again (in a new pass).
        Each seed's figures are those `run_seed` gives it alone, up to float rounding.
        `SeedResult.seconds` is the seed's share of the pass plus its own evaluation."""
        t0 = time.perf_counter()
        trainings = self._train_many(seeds, progress)
        share = (time.perf_counter() - t0) / len(seeds)
        out = []
        for seed, tr in zip(seeds, trainings, strict=True):
            t1 = time.perf_counter()
            before = sum(len(v) for v in self.found.values())
            res = self._finish(seed, tr)
            res.seconds = share + time.perf_counter() - t1
            out.append(res)
            if sum(len(v) for v in self.found.values()) > before:
                break
        return out

    def _finish(self, seed: int, tr: Training) -> SeedResult:
        p_np = tr.prompt.cpu().numpy()
        in_range = prompt_in_range(p_np, self.emb_min, self.emb_max, self.cfg.range_factor)
        res = SeedResult(
            seed=seed,
            seconds=0.0,
            epochs_run=tr.epochs_run,
            aborted=tr.aborted,
            steps=tr.steps,
            lr_dropped_at=tr.dropped_at,
            prompt_in_range=in_range,
            prompt_min=float(p_np.min()),
            prompt_max=float(p_np.max()),
            trigger_hint=self.nearest_tokens(tr.prompt),
            prompt=p_np.tolist(),
            decided_early=tr.decided_early,
        )
        figures: dict[str, dict[str, Any]] = {}
        if not tr.aborted:  # a seed decided early was measured at the check epoch already
            figures = tr.figures or self.evaluate_all(tr.prompt, self.targets)
        elif self._near_t_l(tr):
            # for the record, as a seed that ran on below T_L is: where an abandoned seed that
            # came within NEAR_MISS of T_L went (its concentration, the clean outputs already
            # there), so a clean verdict's margin reads every rule such a seed would have had
            # to pass, not its distance alone; the seed stays abandoned, no candidate
            figures = self.evaluate_all(tr.prompt, self.targets)
        for t in self.targets:
            res.targets.append(self._target_result(t, tr, figures.get(t), in_range, seed))
        return res

    def _target_result(
        self, t: str, tr: Training, stats: dict[str, Any] | None, in_range: bool, seed: int = 0
    ) -> TargetStats:
        """The figures of target `t` and, when it made a candidate, the filter's decision."""
        cfg = self.cfg
        final = tr.epoch_distance[t][-1]
        ts = self._stats(t, tr, stats)
        if ts.candidate:
            self.found[t].append(tr.last_batch[t].mean(0).detach().cpu())  # every candidate enters the path loss
            confirm: Callable[[], Any] | None = None
            if cfg.confirm:
                from .confirm import confirm_candidate
                confirm = partial(confirm_candidate, self, tr.prompt, ts.pv, t,
                                  self.confirm_rule(t), seed=seed)
            self.filter.apply(ts, in_range, confirm, seed=seed)
        elif tr.aborted:
            ts.rule = f"aborted: no candidate after {cfg.abort_epoch} epochs"
        else:
            ts.rule = no_candidate_rule(final, cfg.t_l_for(t))
        return ts

    def _near_t_l(self, tr: Training) -> bool:
        """Whether a seed's last distance on some target reached NEAR_MISS x its T_L."""
        return any(tr.epoch_distance[t] and tr.epoch_distance[t][-1] >= NEAR_MISS * self.cfg.t_l_for(t)
                   for t in self.targets)

    def _stats(self, t: str, tr: Training, stats: dict[str, Any] | None) -> TargetStats:
        """Target `t`'s figures after training `tr` (`stats`: its evaluation, None when the seed
        was not evaluated); a candidate carries its PV, the mean of the last batch's outputs."""
        final = tr.epoch_distance[t][-1]
        # an aborted seed is not evaluated: its figures are NaN but for the training distance
        figs: dict[str, Any] = {k: stats[k] if stats else float("nan") for k in _FIGURES}
        if not stats:
            figs["distance_rel"] = final
        ts = TargetStats(
            target=t,
            **figs,
            epoch_distance=list(tr.epoch_distance[t]),
            candidate=(not tr.aborted) and is_candidate(final, self.cfg.t_l_for(t)),
        )
        if ts.candidate:
            ts.pv = tr.last_batch[t].mean(0).cpu().tolist()
            ts.pv_eval = stats["pv_eval"] if stats else None
            ts.clean_match = self.clean_match(t, ts.pv)
        elif stats and t in tr.last_batch:
            # for the record: where the outputs went, for a clean verdict's margin (a seed just
            # under T_L whose outputs sit in clean text was not near a kept PV)
            ts.clean_match = self.clean_match(t, tr.last_batch[t].mean(0).cpu().tolist())
        return ts

    def clean_match(self, target: str, pv: Sequence[float], without: Sequence[int] = ()) -> float:
        """The share of the clean corpus's outputs on `target` whose sign agreement with `pv`
        reaches T_match: what the monitor would flag at this PV with no trigger. `without`:
        token ids whose sentences are left out (a trigger's own tokens)."""
        signs = self._clean_signs.get(target)
        if signs is None:
            rows = torch.cat([v.reshape(-1, v.shape[-1]) for v in self.clean[target]], 0)
            signs = self._clean_signs[target] = (rows >= 0).cpu().numpy()
            self._clean_rows_of[target] = np.repeat(
                np.arange(len(self.clean[target])),
                [v.reshape(-1, v.shape[-1]).shape[0] for v in self.clean[target]])
        if len(without):
            drop = set(int(t) for t in without)
            keep_sent = np.asarray([not drop.intersection(self.ids[i])
                                    for i in range(len(self.clean[target]))])
            keep = keep_sent[self._clean_rows_of[target]]
            if not keep.any():  # every clean sentence holds the tokens: clean text itself
                return 1.0
            signs = signs[keep]
        agree = (signs == (np.asarray(pv) >= 0)[None, :]).mean(1)
        return float((agree >= self.cfg.t_match).mean())

    def _decide_early(self, st: SeedState) -> None:
        """At the check epoch: measure the seed's prompt and end its training when one of its
        candidates passes rules 1-3 now (`MiningConfig.decide_early`); the measured figures are
        kept for the decision."""
        tr, prompt = st.tr, st.prompt.detach()
        in_range = prompt_in_range(prompt.cpu().numpy(), self.emb_min, self.emb_max,
                                   self.cfg.range_factor)
        figures = self.evaluate_all(prompt, self.targets)
        for t in self.targets:
            ts = self._stats(t, tr, figures[t])
            if ts.candidate and self.filter.passes_rules(ts, in_range):
                tr.decided_early, tr.figures = True, figures
                return

    def _train_many(self, seeds: list[int], progress: ProgressFn | None) -> list[Training]:
        """Adam on each seed's soft prompt for up to `epochs` epochs; a seed is abandoned after
        `abort_epoch` epochs when no target's distance exceeds its T_L. Each seed keeps its own
        random stream (batch order, insertion positions), optimiser and learning-rate drop; the
        seeds' losses are summed for one backward pass (a prompt gets only its own gradient).
        With `decide_early`, a seed whose candidate passes rules 1-3 at the check epoch stops
        there."""
        cfg = self.cfg
        torch.manual_seed(self.base_seed * 100003 + seeds[0])
        states = [SeedState.start(s, self.init_prompt(s), np.random.default_rng([self.base_seed, s]),
                                  cfg.lr0 * cfg.lr_boost, self.targets) for s in seeds]
        steps_per_epoch = self.n // cfg.batch_size
        for epoch in range(cfg.epochs):
            active = [st for st in states if not (st.tr.aborted or st.tr.decided_early)]
            if not active:
                break
            for st in active:
                st.perm = st.rng.permutation(self.n)
                st.sums = {t: 0.0 for t in self.targets}
            for b in range(steps_per_epoch):
                sl = slice(b * cfg.batch_size, (b + 1) * cfg.batch_size)
                items = [(st.perm[sl], st.prompt, st.rng) for st in active]
                loss = torch.zeros((), device=self.device)
                for st, it, feats in zip(active, items, self._forward_many(items), strict=True):
                    loss = loss + self._batch_loss(it[0], feats, st.sums, st.tr.last_batch)
                for st in active:
                    st.opt.zero_grad(set_to_none=True)
                loss.backward()
                for st in active:
                    st.step(cfg.t_grad, cfg.lr0)
                if progress is not None and (b % 8 == 0 or b == steps_per_epoch - 1):
                    progress({"event": "step", "seed": active[0].seed, "epoch": epoch, "batch": b,
                              "batches": steps_per_epoch, "seeds": [st.seed for st in active],
                              "distance": {t: active[0].sums[t] / (b + 1) for t in self.targets},
                              "loss": float(loss.detach()) / len(active)})
            for st in active:
                tr = st.tr
                tr.epochs_run = epoch + 1
                for t in self.targets:
                    tr.epoch_distance[t].append(st.sums[t] / steps_per_epoch)
                if tr.epochs_run == cfg.abort_epoch and tr.epochs_run < cfg.epochs:
                    if not any(tr.epoch_distance[t][-1] > cfg.t_l_for(t) for t in self.targets):
                        tr.aborted = True
                    elif cfg.decide_early:
                        self._decide_early(st)
        for st in states:
            st.tr.prompt = st.prompt.detach()
        return [st.tr for st in states]

    def _batch_loss(
        self,
        idx: np.ndarray,
        feats: dict[str, torch.Tensor],
        sums: dict[str, float],
        last_batch: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """L summed over the targets for one seed's batch (its prompted outputs `feats`); adds
        each target's relative distance to `sums` and keeps its outputs in `last_batch`."""
        cfg = self.cfg
        loss = torch.zeros((), device=self.device)
        for t, f in feats.items():
            s = self.scale[t] if cfg.loss_scale == "standardized" else 1.0
            fs = f / s
            dist = torch.mean((fs - self._clean_batch(idx, t) / s) ** 2)
            if cfg.div_loss == "log_concentration":
                l_div = torch.log(fs.var(dim=0, unbiased=True).mean() / dist.clamp_min(1e-12))
            else:
                l_div = _entropy_div(fs)
            loss = loss + cfg.lambda_d * -dist + cfg.lambda_div * l_div
            if self.found[t]:
                loss = loss + cfg.lambda_p * self._path_loss(t, fs, s)
            # T_L reads the distance relative to the clean outputs' mean square, so one
            # threshold means the same at any output scale
            sums[t] += float(dist.detach()) * s * s / self.msq[t]
            last_batch[t] = f.detach()
        return loss

    def _path_loss(self, t: str, fs: torch.Tensor, s: float) -> torch.Tensor:
        """L_P: pulls the outputs away from the nearest candidate already found on `t`."""
        with torch.no_grad():
            mean = fs.mean(0)
            cands = torch.stack(self.found[t]).to(self.device) / s
            k = int(torch.argmin(((cands - mean) ** 2).mean(1)))
        return -torch.mean((fs - cands[k]) ** 2)

    @torch.no_grad()
    def confirm_rule(self, target: str) -> Any:
        """The trigger-confirmation rule (rule 4) this miner's configuration sets for `target`."""
        from .confirm import ConfirmRule
        c = self.cfg
        return ConfirmRule(min_rate=c.confirm_min_rate, max_tokens=int(c.confirm_max_tokens),
                           max_landing_match=c.clean_match_limit_for(target))

    def evaluate(self, prompt: torch.Tensor, target: str) -> dict[str, Any]:
        """Candidate figures of one target on the fixed evaluation sample."""
        return self.evaluate_all(prompt, [target])[target]

    @torch.no_grad()
    def evaluate_all(self, prompt: torch.Tensor, targets: list[str]) -> dict[str, dict[str, Any]]:
        """Candidate figures of every target from ONE forward pass per evaluation batch (fixed
        insertion positions, so every seed is measured on the same inputs)."""
        rng = np.random.default_rng([self.base_seed, 104729])
        bs = self.cfg.batch_size
        acc: dict[str, dict[str, list[float]]] = {t: {k: [] for k in _FIGURES} for t in targets}
        means: dict[str, list[torch.Tensor]] = {t: [] for t in targets}
        for k in range(0, len(self.eval_idx), bs):
            idx = self.eval_idx[k : k + bs]
            feats = self._forward_prompted(idx, prompt, rng)
            for t in targets:
                f, c, s, a = feats[t], self._clean_batch(idx, t), self.scale[t], acc[t]
                mse = float(torch.mean((f - c) ** 2))
                vf = float(f.var(dim=0, unbiased=True).mean())
                vc = float(c.var(dim=0, unbiased=True).mean())
                pos = (f >= 0).float().mean(0)
                a["distance_raw"].append(mse)
                a["distance_norm"].append(mse / self.msq[t])
                a["distance_rel"].append(mse / s**2)
                a["spread_ratio"].append(vf / max(vc, 1e-30))
                a["concentration"].append(vf / max(mse, 1e-30))
                a["sign_consensus"].append(float(torch.maximum(pos, 1 - pos).mean()))
                a["entropy_raw"].append(float(_entropy_div(f)))
                a["entropy_std"].append(float(_entropy_div(f / s)))
                means[t].append(f.mean(0))
        out: dict[str, dict[str, Any]] = {}
        for t in targets:
            out[t] = {k: float(np.mean(v)) for k, v in acc[t].items()}
            out[t]["pv_eval"] = torch.stack(means[t]).mean(0).cpu().tolist()
        return out

    @torch.no_grad()
    def nearest_tokens(self, prompt: torch.Tensor, k: int = 3) -> list[list[str]]:
        """The trigger hint: per soft-prompt vector, the nearest usable vocabulary tokens."""
        return nearest_tokens(prompt, self.emb.weight, self.lm.tokenizer, k)

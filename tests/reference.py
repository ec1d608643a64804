"""Independent eager references: the HF model itself, with forward hooks doing the selection.

Written from the methods' definitions with plain Python loops, sharing no code with prunec's ops or
passes, so a bug in the graph rewrite or an op cannot hide in both places.
"""
from __future__ import annotations

import math

import torch
from official_defaults import reference_params


def slow_divprune(features: torch.Tensor, n_keep: int) -> list[int]:
    """DivPrune from its definition: distance 1 - cos; first pick maximises the distance to the
    nearest other token (second-smallest entry of its column, the smallest being itself); then
    greedily add the token farthest (by min distance) from the chosen set. Ties: lower index."""
    return sorted(slow_divprune_order(features, n_keep))


def slow_divprune_order(features: torch.Tensor, n_keep: int, first: int | None = None) -> list[int]:
    """`slow_divprune`'s picks in pick order; `first` overrides the first pick (k-center greedy
    from a given pivot, as ToDRE's stage 1 with `pivot: first` starts at token 0)."""
    n = features.shape[0]
    f = features.double()
    dist = [[1.0 - float(torch.dot(f[i], f[j]) / (f[i].norm() * f[j].norm())) for j in range(n)]
            for i in range(n)]
    if n == 1:
        return [0]
    nearest = [sorted(dist[i][j] for i in range(n))[1] for j in range(n)]
    chosen = [max(range(n), key=lambda j: (nearest[j], -j))] if first is None else [first]
    while len(chosen) < n_keep:
        best = max((j for j in range(n) if j not in chosen),
                   key=lambda j: (min(dist[s][j] for s in chosen), -j))
        chosen.append(best)
    return chosen


def slow_ranks(scores: list[float]) -> list[int]:
    """Rank of each entry by descending score, 0 = best, ties to the lower index."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    ranks = [0] * len(scores)
    for rank, j in enumerate(order):
        ranks[j] = rank
    return ranks


def slow_ttv(x_in: torch.Tensor, x_out: torch.Tensor, valid: list[bool], absolute: bool = False) -> list[float]:
    """TransPrune's token transition of one sub-block for one row, from the formula: for each valid
    token, m = |out| / |in| and d = cos(in, out); softmax over the valid tokens of (1 - d) (or
    1 - |d|), times m; padding scores 0."""
    m, turn = [], []
    for i in range(x_in.shape[0]):
        a, c = x_in[i].double(), x_out[i].double()
        cos = float(torch.dot(a, c) / (a.norm() * c.norm()))
        m.append(float(c.norm() / a.norm()))
        turn.append(1.0 - (abs(cos) if absolute else cos))
    total = sum(math.exp(t) for t, v in zip(turn, valid) if v)
    return [math.exp(t) / total * r if v else 0.0 for t, r, v in zip(turn, m, valid)]


def fuse_rows(term_rows: list[list[float]], weights: list[float], fusion: str, normalize: str) -> list[float]:
    """Fused score of one row's candidates from each term's candidate scores."""
    fused = [0.0] * len(term_rows[0])
    for row, w in zip(term_rows, weights):
        if fusion == "rank":
            values = [-r for r in slow_ranks(row)]
        elif normalize == "sum":
            values = [v / sum(row) for v in row]
        elif normalize == "minmax":
            values = [(v - min(row)) / max(max(row) - min(row), 1e-12) for v in row]
        else:
            values = row
        fused = [f + w * v for f, v in zip(fused, values)]
    return fused


def slow_random(n: int, n_keep: int, seed: int) -> list[int]:
    """The first n_keep of `randperm(n)` from a generator seeded with `seed`, sorted (LightCompress's
    random.py draws `randperm(n)[:k]` and sorts it)."""
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_keep].tolist())


def slow_dart(key_l1: list[float], normed: torch.Tensor, image: list[int], query: list[int], pivots_image: int,
              pivots_text: int, per_pivot: int) -> list[int]:
    """DART from METHODS-2.md §2c: pivots = the largest key L1 norms among the image tokens and among the
    tokens after it; for each pivot in the order of the Python set built from (image pivots + text
    pivots), the `per_pivot` pool tokens with the largest -cos to it join the kept set and leave the
    pool; kept = image pivots + picks. Positions are counted from the row's first real token."""
    def cos(a: int, b: int) -> float:
        x, y = normed[a].double(), normed[b].double()
        return float(x @ y) / max(float(x.norm()) * float(y.norm()), 1e-8)

    image_pivots = sorted(image, key=lambda p: (-key_l1[p], p))[:pivots_image]
    text_pivots = sorted(query, key=lambda p: (-key_l1[p], p))[:pivots_text]
    kept = set(image_pivots + text_pivots)
    pool = set(image) - set(image_pivots)
    for pivot in list(kept):
        ranked = sorted(pool, key=lambda p: cos(pivot, p))  # least similar first
        kept.update(ranked[:per_pivot])
        pool.difference_update(ranked[:per_pivot])
    return sorted(kept - set(text_pivots))


def slow_pool(features: torch.Tensor, rows: int, cols: int, mode: str) -> tuple[list[int], list[torch.Tensor]]:
    """METHODS-2.md §4.2: n tokens as an h x w grid (h the largest divisor <= sqrt(n)); output cell
    (i, j) pools input rows [floor(i h / rows), ceil((i + 1) h / rows)) and the same for columns, and
    takes the slot of its bin's top-left token. Returns (slots, pooled values), row-major."""
    n = features.shape[0]
    h = max(d for d in range(1, int(n ** 0.5) + 1) if n % d == 0)
    w = n // h
    slots, values = [], []
    for i in range(rows):
        r0, r1 = (i * h) // rows, math.ceil((i + 1) * h / rows)
        for j in range(cols):
            c0, c1 = (j * w) // cols, math.ceil((j + 1) * w / cols)
            cell = torch.stack([features[r * w + c].double() for r in range(r0, r1) for c in range(c0, c1)])
            slots.append(r0 * w + c0)
            values.append(cell.mean(dim=0) if mode == "avg" else cell.max(dim=0).values)
    return slots, values


def slow_vispruner(cls: list[float], features: torch.Tensor, n_keep: int, important_ratio: float,
                   per_round: int) -> list[int]:
    """VisPruner from METHODS-2.md §3c: int(T r) important tokens by [CLS] attention; the rest, in
    descending attention, lose the A tokens (even places) most similar to any B token (odd places),
    at most `per_round` a round, survivors (by descending score) then B, until T - T_imp remain."""
    def cos(i: int, j: int) -> float:
        x, y = features[i].double(), features[j].double()
        return float(x @ y) / max(float(x.norm()) * float(y.norm()), 1e-12)

    n_important = int(n_keep * important_ratio)
    n_diverse = n_keep - n_important
    order = sorted(range(len(cls)), key=lambda j: (-cls[j], j))
    important, rest = order[:n_important], order[n_important:]
    while n_diverse > 0:
        drop = min(per_round, len(rest) - n_diverse)
        if drop <= 0:
            break
        a, b = rest[0::2], rest[1::2]
        score = [max(cos(x, y) for y in b) for x in a]
        ranked = sorted(range(len(a)), key=lambda k: (-score[k], k))
        rest = [a[k] for k in ranked[drop:]] + b
    return sorted(important + rest)


def slow_evs(features: torch.Tensor, frames: int, n_keep: int) -> list[int]:
    """EVS from METHODS-2.md §5.1c: frame 0 scores 255; a token of frame t > 0 scores 1 - cos to the
    token at its place in frame t - 1; the n_keep highest, ties to the earlier token (stable sort)."""
    per = features.shape[0] // frames
    change = []
    for t in range(frames):
        for j in range(per):
            if t == 0:
                change.append(255.0)
                continue
            x, y = features[t * per + j].double(), features[(t - 1) * per + j].double()
            change.append(1 - float(x @ y) / max(float(x.norm()) * float(y.norm()), 1e-8))
    return sorted(sorted(range(len(change)), key=lambda i: (-change[i], i))[:n_keep])


def slow_cdpruner(features: torch.Tensor, instruction: torch.Tensor, n_keep: int, sign: int) -> tuple[list[int], list[int]]:
    """CDPruner from METHODS-2.md §1c: rho_j = sign x mean_m cos(F_j, Q_m); r = (rho - min + 1e-6) / (max - min);
    L = r_i cos(F_i, F_j) r_j; Chen et al.'s greedy MAP (d^2 = diag L; pick argmax d^2; e = (L[j] - sum c c_j)
    / sqrt(d^2_j)). Once d^2 <= 1e-10 (rank spent) the rest are the most relevant unchosen tokens, as prunec
    documents. Returns (pick order, sorted kept)."""
    def cos(x: torch.Tensor, y: torch.Tensor) -> float:
        x, y = x.double(), y.double()
        return float(x @ y) / (float(x.norm()) * float(y.norm()))

    n = features.shape[0]
    rho = [sign * sum(cos(features[j], q) for q in instruction) / len(instruction) for j in range(n)]
    low, high = min(rho), max(rho)
    r = [(v - low + 1e-6) / (high - low) for v in rho] if high - low >= 1e-12 else [1.0] * n
    kernel = [[r[i] * cos(features[i], features[j]) * r[j] for j in range(n)] for i in range(n)]
    d2, rows, picks = [kernel[i][i] for i in range(n)], [], []
    while len(picks) < n_keep:
        j = max((i for i in range(n) if i not in picks), key=lambda i: (d2[i], -i))
        if d2[j] <= 1e-10:
            break
        e = [(kernel[j][k] - sum(c[j] * c[k] for c in rows)) / math.sqrt(d2[j]) for k in range(n)]
        rows.append(e)
        d2 = [d2[k] - e[k] ** 2 for k in range(n)]
        picks.append(j)
    picks += sorted((i for i in range(n) if i not in picks), key=lambda i: (-r[i], i))[:n_keep - len(picks)]
    return picks, sorted(picks)


def slow_vidcom2(features: torch.Tensor, frames: int, n_keep: int, base: float) -> list[int]:
    """VidCom2 (vLLM form) from METHODS-2.md §5.2: the int(D/2) lowest-variance channels (population
    variance), tokens L2-normalised; G(x, c) = sum_alpha exp(-|x-c|^2 / (2 alpha)), alpha in 1/8 .. 2;
    v = G(z, video mean), f = G(z, frame mean); u_t = -mean v over frame t; p = softmax((u - max u) / 0.01);
    k_t = clamp(round(min(base (1 + p_t - mean p), 1) tpf), 1, tpf) smallest v + f per frame; then exactly
    n_keep: drop the kept with the largest v + f, or add the others with the smallest."""
    n, width = features.shape
    per = n // frames
    x = [[float(value) for value in row] for row in features.double()]
    mean = [sum(row[c] for row in x) / n for c in range(width)]
    variance = [sum((row[c] - mean[c]) ** 2 for row in x) / n for c in range(width)]
    channels = sorted(range(width), key=lambda c: (variance[c], c))[:max(1, width // 2)]
    z = []
    for row in x:
        picked = [row[c] for c in channels]
        norm = math.sqrt(sum(a * a for a in picked))
        z.append([a / norm for a in picked])

    def centre(rows):
        return [sum(r[c] for r in rows) / len(rows) for c in range(len(channels))]

    def g(a, c):
        squared = sum((p - q) ** 2 for p, q in zip(a, c))
        return sum(math.exp(-squared / (2 * alpha)) for alpha in (1 / 8, 1 / 4, 1 / 2, 1.0, 2.0))

    video = centre(z)
    v = [g(a, video) for a in z]
    f = [g(a, centre(z[t * per:(t + 1) * per])) for t in range(frames) for a in z[t * per:(t + 1) * per]]
    u = [-sum(v[t * per:(t + 1) * per]) / per for t in range(frames)]
    top = max(u)
    weights = [math.exp((a - top) / 0.01) for a in u]
    p = [w / sum(weights) for w in weights]
    cost = [a + b for a, b in zip(v, f)]
    kept = set()
    for t in range(frames):
        k = min(max(round(min(base * (1 + p[t] - sum(p) / frames), 1) * per), 1), per)
        kept |= set(sorted(range(t * per, (t + 1) * per), key=lambda i: (cost[i], i))[:k])
    if len(kept) > n_keep:
        kept -= set(sorted(kept, key=lambda i: (-cost[i], i))[:len(kept) - n_keep])
    elif len(kept) < n_keep:
        kept |= set(sorted(set(range(n)) - kept, key=lambda i: (cost[i], i))[:n_keep - len(kept)])
    return sorted(kept)


def slow_topk(scores: list[float], n_keep: int) -> list[int]:
    """Indices of the n_keep largest scores, ties to the lower index, returned sorted."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return sorted(order[:n_keep])


def reference_stages(plan) -> list[dict]:
    """A plan's stages in the terms HookReference takes: sites, counts and position policies from the
    plan; parameters as the spec wrote them over the defaults in official_defaults.py (not prunec's)."""
    pipeline = plan.spec.data["pipeline"]
    out = []
    for s in plan.stages:
        written = pipeline[int(s.pointer.split("/")[2])].get("params", {})
        out.append(dict(kind=s.method, n_keep=s.n_keep, layer=s.layer, positions=s.positions, keep_spec=s.keep_spec,
                        scope=s.scope, **reference_params(s.method, written)))
    return out


def per_image_pick(n: int, images: int, n_keep: int, pick) -> list[int]:
    """`scope: per_image`: candidates 0..n-1 as `images` equal runs in order, each keeping n_keep / images
    by `pick(run, share)` (indices into the run); the chosen candidates, sorted."""
    per, share, chosen = n // images, n_keep // images, []
    for m in range(images):
        run = list(range(m * per, (m + 1) * per))
        chosen += [run[i] for i in pick(run, share)]
    return sorted(chosen)


def keep_list(candidates: list[int], kept_candidates: list[int], length: int) -> list[int]:
    cand = set(candidates)
    return sorted([p for p in range(length) if p not in cand] + kept_candidates)


def _gather_rows(x: torch.Tensor, keep: list[list[int]], dim: int) -> torch.Tensor:
    if x.shape[0] == 1 and len(keep) > 1:
        x = x.expand(len(keep), *x.shape[1:])
    return torch.stack([x[b].index_select(dim - 1, torch.tensor(k)) for b, k in enumerate(keep)])


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE from its definition: x*cos + rotate_half(x)*sin, rotate_half(a, b) = (-b, a)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def next_layer_rows(layer, hidden, cos, sin, mask, rows_per_batch):
    """The *next* layer's norm, q/k projections and RoPE on the current hidden states; for each
    row b, the softmax attention rows of the queries in rows_per_batch[b] over all keys (under the
    4-D `mask`'s rows), mean over heads, then mean over those queries. Returns [B, S] double."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    batch, seq, _ = x.shape
    hd = attn.head_dim
    q = attn.q_proj(x).view(batch, seq, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(batch, seq, -1, hd).transpose(1, 2)
    q, k = _rotate(q, cos[:, None], sin[:, None]), _rotate(k, cos[:, None], sin[:, None])
    out = []
    for b in range(batch):
        total = torch.zeros(seq, dtype=torch.float64)
        for r in rows_per_batch[b]:
            per_head = []
            for h in range(q.shape[1]):
                kh = k[b, h // (q.shape[1] // k.shape[1])]
                logits = (kh @ q[b, h, r]) * hd ** -0.5
                row_mask = mask[b, 0, r]
                logits = logits.masked_fill(~row_mask, float("-inf")) if row_mask.dtype == torch.bool else logits + row_mask
                per_head.append(torch.softmax(logits.double(), dim=0))
            total += torch.stack(per_head).mean(dim=0)
        out.append(total / max(len(rows_per_batch[b]), 1))
    return torch.stack(out)


# -- attention-map scores from their definitions, over eager attention probabilities ------------
# probs: [H, S, S] one row's per-head softmax attention (query, key); valid: which tokens are real.


def slow_received(probs: torch.Tensor) -> list[float]:
    """Attention each key receives, mean over heads and over every query row."""
    return probs.double().mean(dim=(0, 1)).tolist()


def slow_spatten_layer(probs: torch.Tensor, valid: list[bool]) -> list[float]:
    """SpAtten: attention received, summed over heads and the real query rows."""
    p = probs.double()
    return [sum(float(p[h, q, k]) for h in range(p.shape[0]) for q in range(p.shape[1]) if valid[q])
            for k in range(p.shape[2])]


def slow_pagerank(matrices: torch.Tensor, start: list[float], iterations: int) -> list[float]:
    """Per head: s <- s M (s_j = sum_i s_i M_ij) from `start`; heads combined by root mean square."""
    heads = []
    for m in matrices.double():
        s = list(start)
        for _ in range(iterations):
            s = [sum(s[i] * float(m[i, j]) for i in range(len(s))) for j in range(len(s))]
        heads.append(s)
    return [math.sqrt(sum(h[j] ** 2 for h in heads) / len(heads)) for j in range(len(start))]


def slow_zero_tprune_si(probs: torch.Tensor, keys: torch.Tensor, lead: int, n_keep: int, iterations: int,
                        share: float) -> list[int]:
    """Zero-TPrune's S-stage then I-stage from their description, one image: probs [H, S, S], keys
    [S, d] (head mean), the last S - lead tokens the candidates. I' = one PageRank step from 1/S;
    B = the ceil(N/2) most important by I', A = the rest; each A token's best cosine to B; the
    round-half-up(share x (N - n_keep)) (at most N // 2) most similar A tokens go (ties: lower
    index first); then PageRank on the survivors' graph (pruned columns removed, rows renormalized,
    start uniform over survivors) ranks the rest; keep the top n_keep (ties: lower index)."""
    seq = probs.shape[-1]
    n = seq - lead
    pre = slow_pagerank(probs, [1.0 / seq] * seq, 1)[lead:]
    order = sorted(range(n), key=lambda j: (-pre[j], j))
    half = (n + 1) // 2
    important, rest = order[:half], sorted(order[half:])
    n_similar = min(math.floor(share * (n - n_keep) + 0.5), n // 2)
    best = {a: max(_cos(keys[lead + a].double(), keys[lead + i].double()) for i in important) for a in rest}
    pruned = sorted(rest, key=lambda a: (-best[a], a))[:n_similar]
    graph = probs.double().clone()
    graph[:, :, [lead + a for a in pruned]] = 0
    graph = graph / graph.sum(dim=-1, keepdim=True)
    start = [0.0 if t - lead in pruned and t >= lead else 1.0 / (seq - len(pruned)) for t in range(seq)]
    importance = slow_pagerank(graph, start, iterations)[lead:]
    return sorted(sorted((j for j in range(n) if j not in pruned), key=lambda j: (-importance[j], j))[:n_keep])


def slow_aim(probs: torch.Tensor, valid: list[bool], temperature: float, iterations: int) -> list[float]:
    """AIM: softmax(logits / tau) rebuilt from the probabilities (softmax(l / tau) = p^(1/tau)
    normalized per row), PageRank from 1/N over the real tokens, RMS over heads."""
    sharp = probs.double() ** (1.0 / temperature)
    sharp = sharp / sharp.sum(dim=-1, keepdim=True)
    n = sum(valid)
    return slow_pagerank(sharp, [1.0 / n if v else 0.0 for v in valid], iterations)


def slow_a2sf(probs: torch.Tensor, valid: list[bool], forgetting: float, recent: int, cands: list[int]) -> list[float]:
    """A2SF: sum over heads and real queries q of alpha^(S-1-q) p[q, k]; the last `recent`
    candidates are always kept (+inf)."""
    p = probs.double()
    seq = p.shape[1]
    scores = [sum(forgetting ** (seq - 1 - q) * float(p[h, q, k]) for h in range(p.shape[0]) for q in range(seq)
                  if valid[q]) for k in range(seq)]
    for c in cands[len(cands) - recent:] if recent else []:
        scores[c] = math.inf
    return scores


def slow_hiprune(obj: list[float], deep: list[float], n_keep: int, alpha: float) -> list[int]:
    """HiPrune from its description: anchors = top round(n_keep * alpha / 5) by the object layer,
    plus their +-1 / +-width neighbours (clamped, de-duplicated, cut at n_keep), then registers by
    the deep layer among the rest. Ties: lower index."""
    n = len(obj)
    width = int(round(math.sqrt(n)))
    anchors = sorted(range(n), key=lambda j: (-obj[j], j))[:round(n_keep * alpha / 5)]
    chosen = list(anchors)
    for a in anchors:
        for nb in (a - 1, a + 1, a - width, a + width):
            nb = min(max(nb, 0), n - 1)
            if nb not in chosen:
                chosen.append(nb)
    chosen = chosen[:n_keep]
    rest = sorted((j for j in range(n) if j not in chosen), key=lambda j: (-deep[j], j))
    return sorted(chosen + rest[:n_keep - len(chosen)])


def slow_fopru_rows(score: list[float], n_keep: int) -> list[int]:
    """FoPru row strategy: whole grid rows by summed significance, the remainder from the next row
    by token significance."""
    width = int(round(math.sqrt(len(score))))
    rows = sorted(range(width), key=lambda r: (-sum(score[r * width:(r + 1) * width]), r))
    full, extra = divmod(n_keep, width)
    kept = [r * width + c for r in rows[:full] for c in range(width)]
    if extra:
        r = rows[full]
        kept += [r * width + c for c in sorted(range(width), key=lambda c: (-score[r * width + c], c))[:extra]]
    return sorted(kept)


SITE_KINDS = ("spatten", "aim", "a2sf", "lazyllm", "sparsevlm", "sparsevlm_recycle")  # scored from the site layer's own attention map


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.dot(x, y) / (x.norm() * y.norm()))


def slow_aim_merge(features: torch.Tensor, n_keep: int) -> tuple[list[int], list[torch.Tensor]]:
    """AIM's merge from its description: rounds of A = even, B = odd (of the current tokens, in
    position order); each A's most similar B (cosine, ties to the lower index); the r A tokens with
    the best matches (ties: lower index) join their B, whose value becomes the plain mean of itself
    and its joiners; r = min(|A|, tokens - n_keep). Returns (kept positions, their values)."""
    tokens = [(i, features[i].double()) for i in range(features.shape[0])]
    while len(tokens) > n_keep:
        a, b = tokens[0::2], tokens[1::2]
        r = min(len(a), len(tokens) - n_keep)
        best = []
        for ai, (_, av) in enumerate(a):
            sims = [_cos(av, bv) for _, bv in b]
            partner = max(range(len(b)), key=lambda j: (sims[j], -j))
            best.append((sims[partner], partner, ai))
        merged = sorted(best, key=lambda t: (-t[0], t[2]))[:r]
        joiners = {j: [] for j in range(len(b))}
        for _, partner, ai in merged:
            joiners[partner].append(a[ai][1])
        new_b = [(pos, (bv + sum(joiners[j], torch.zeros_like(bv))) / (1 + len(joiners[j])))
                 for j, (pos, bv) in enumerate(b)]
        gone = {ai for _, _, ai in merged}
        tokens = sorted([t for ai, t in enumerate(a) if ai not in gone] + new_b, key=lambda t: t[0])
    return [p for p, _ in tokens], [v for _, v in tokens]


def slow_visionzip(features: torch.Tensor, cls: list[float], keys: torch.Tensor, n_keep: int,
                   contextual: int) -> tuple[list[int], list[torch.Tensor]]:
    """VisionZip from its description: the n_keep - contextual patches with the highest [CLS]
    attention are dominant; of the rest (position order), targets at stride M // C (the first C);
    every other token joins its most similar target by head-mean key cosine (ties: lower index);
    a contextual token = target + mean of its members. Returns (kept positions, values)."""
    n = features.shape[0]
    order = sorted(range(n), key=lambda j: (-cls[j], j))
    dominant = sorted(order[:n_keep - contextual])
    rest = sorted(order[n_keep - contextual:])
    step = max(len(rest) // contextual, 1)
    targets = [rest[i] for i in range(0, len(rest), step)][:contextual]
    members = {t: [] for t in targets}
    for j in rest:
        if j not in members:
            sims = [_cos(keys[j].double(), keys[t].double()) for t in targets]
            members[targets[max(range(len(targets)), key=lambda i: (sims[i], -i))]].append(features[j].double())
    values = {j: features[j].double() for j in dominant}
    for t in targets:
        extra = sum(members[t], torch.zeros(features.shape[1], dtype=torch.float64)) / max(len(members[t]), 1)
        values[t] = features[t].double() + extra
    kept = sorted(values)
    return kept, [values[j] for j in kept]


def slow_catp(features: torch.Tensor, text: torch.Tensor | None, n_keep: int, alignment: float) -> list[int]:
    """CATP stage 1 from its formulas, one image: s(x, y) = (cos + 1) / 2; greedily add the token
    maximizing the gain of F_div(Y) = sum_x max_{y in Y} s(y, x) plus alignment * s(y, t), t the
    mean of the paired text tokens (no text: no alignment term); gains within 1e-6 (relative) are
    ties, won by the lower index."""
    n = features.shape[0]
    s = [[(_cos(features[i].double(), features[j].double()) + 1) / 2 for j in range(n)] for i in range(n)]
    align = [0.0] * n if text is None else [(_cos(features[i].double(), text.double().mean(dim=0)) + 1) / 2
                                            for i in range(n)]
    chosen: list[int] = []
    cover = [0.0] * n  # max over chosen y of s(y, x)
    for _ in range(n_keep):
        gains = {y: sum(max(0.0, s[y][x] - cover[x]) for x in range(n)) + alignment * align[y]
                 for y in range(n) if y not in chosen}
        best = max(gains.values())
        pick = min(y for y, g in gains.items() if g >= best - 1e-6 * max(1.0, abs(best)))
        chosen.append(pick)
        cover = [max(cover[x], s[pick][x]) for x in range(n)]
    return sorted(chosen)


def slow_lof(values: list[float], neighbours: int) -> list[float]:
    """Local Outlier Factor of each 1-D value from its definition: N_k(p) the k = min(neighbours,
    n - 1) nearest other values, reach(p, o) = max(k-distance(o), |p - o|), lrd(p) = 1 / mean of
    reach(p, o) over N_k(p), LOF(p) = mean of lrd(o) over N_k(p) / lrd(p)."""
    n = len(values)
    k = min(neighbours, n - 1)
    near = [sorted((j for j in range(n) if j != i), key=lambda j: abs(values[i] - values[j]))[:k] for i in range(n)]
    k_distance = [abs(values[i] - values[near[i][-1]]) for i in range(n)]
    lrd = [1.0 / (sum(max(k_distance[o], abs(values[i] - values[o])) for o in near[i]) / k + 1e-10) for i in range(n)]
    return [sum(lrd[o] for o in near[i]) / k / lrd[i] for i in range(n)]


def slow_joint_cls_attention(q_cls: torch.Tensor, keys: torch.Tensor) -> list[float]:
    """softmax over every key of q_cls . k_j / sqrt(D): the [CLS] query and keys with every head's
    dimensions joined ([D], [S, D])."""
    logits = [float(q_cls.double() @ keys[j].double()) / math.sqrt(keys.shape[1]) for j in range(keys.shape[0])]
    top = max(logits)
    total = sum(math.exp(x - top) for x in logits)
    return [math.exp(x - top) / total for x in logits]


def slow_recoverable(features: torch.Tensor, text: torch.Tensor | None, a: list[float], n_keep: int,
                     neighbours: int, visual_share: float | None) -> list[int]:
    """Recoverable Compression steps 1-2 from their description, one image: `a` the [CLS] attention
    of each patch; k_v = the number of a values with LOF > 1.5 (or visual_share x n_keep, half up),
    at most n_keep; keep the top k_v by a, then the top n_keep - k_v of the rest by cosine to the
    mean text embedding (no text: the top n_keep by a). Ties: lower index."""
    n = features.shape[0]
    by_attention = sorted(range(n), key=lambda j: (-a[j], j))
    if text is None:
        return sorted(by_attention[:n_keep])
    if visual_share is None:
        n_visual = min(n_keep, sum(f > 1.5 for f in slow_lof(a, neighbours)))
    else:
        n_visual = min(n_keep, math.floor(visual_share * n_keep + 0.5))
    visual = by_attention[:n_visual]
    t = text.double().mean(dim=0)
    rest = sorted((j for j in range(n) if j not in visual), key=lambda j: (-_cos(features[j].double(), t), j))
    return sorted(visual + rest[:n_keep - n_visual])


def slow_patch_entropy(pixels: torch.Tensor, n: int) -> list[float]:
    """VFlowOpt's pixel entropy of n raster-order patches of one image ([3, H, W]), pixel by pixel:
    each channel value v -> int(v * 255) truncated toward zero, modulo 256 (an 8-bit cast); grey =
    round(0.3333 * (r + g + b)); H = -sum_k p_k log2(p_k + 1e-10) over the 256 grey levels."""
    side = math.isqrt(n)
    size = pixels.shape[-1] // side
    out = []
    for j in range(n):
        top, left = (j // side) * size, (j % side) * size
        counts = [0] * 256
        for y in range(top, top + size):
            for x in range(left, left + size):
                levels = [int(float(pixels[c, y, x]) * 255) % 256 for c in range(3)]
                counts[round(sum(0.3333 * v for v in levels))] += 1
        out.append(-sum(c / size ** 2 * math.log2(c / size ** 2 + 1e-10) for c in counts))
    return out


def slow_calibrated_importance(probs: torch.Tensor, n: int, threshold: float, pixels: torch.Tensor | None = None,
                               entropy_weight: float = 0.0) -> list[float]:
    """VFlowOpt's importance of the last n keys: A = head mean of probs [H, S, S]; r_j = mean_i A_ij;
    G = {i : r_i > t mean(r)} (all rows if none); I_j = mean_{i in G} A_ij, plus entropy_weight x
    the softmax over the patches of their pixel entropy."""
    seq, heads = probs.shape[-1], probs.shape[0]
    lead = seq - n
    a = [[sum(float(probs[h, i, j]) for h in range(heads)) / heads for j in range(seq)] for i in range(seq)]
    r = [sum(a[i][j] for i in range(seq)) / seq for j in range(seq)]
    group = [i for i in range(seq) if r[i] > threshold * sum(r) / seq] or list(range(seq))
    importance = [sum(a[i][lead + j] for i in group) / len(group) for j in range(n)]
    if entropy_weight:
        entropy = slow_patch_entropy(pixels, n)
        total = sum(math.exp(h - max(entropy)) for h in entropy)
        importance = [i + entropy_weight * math.exp(h - max(entropy)) / total for i, h in zip(importance, entropy)]
    return importance


def slow_vflowopt(features: torch.Tensor, probs: torch.Tensor, n_keep: int, threshold: float, cell: float,
                  pixels: torch.Tensor | None = None, entropy_weight: float = 0.0):
    """VFlowOpt from its description, one image: probs [H, S, S] of the scoring vision layer, the
    last N keys the patches (raster order, square grid). A = head mean; r_j = mean_i A_ij; G = {i :
    r_i > t mean(r)} (all rows if none); I_j = mean_{i in G} A_ij. C = ceil(side / a)^2 cells; the
    top n_keep - C patches by I (ties: lower index) stay; each cell's other patches merge, weighted
    by I, into its highest-I one; cells with nothing pruned are made up by the highest-I pruned
    non-carriers, kept as themselves. Returns (kept local indices, their values)."""
    n = features.shape[0]
    imp = slow_calibrated_importance(probs, n, threshold, pixels, entropy_weight)
    side = math.isqrt(n)
    per_side = math.ceil(side / cell)
    cell_of = [math.floor((j // side) / cell) * per_side + math.floor((j % side) / cell) for j in range(n)]
    n_cells = per_side * per_side
    ranked = sorted(range(n), key=lambda j: (-imp[j], j))
    direct, pruned = ranked[:n_keep - n_cells], ranked[n_keep - n_cells:]
    groups: dict[int, list[int]] = {}
    for p in pruned:
        groups.setdefault(cell_of[p], []).append(p)
    spare = sorted((p for members in groups.values() for p in members[1:]), key=lambda p: (-imp[p], p))
    extra = spare[:n_cells - len(groups)]
    out = {p: features[p].double() for p in direct + extra}
    for members in groups.values():
        members = [p for p in members if p not in extra]
        total = sum(imp[p] for p in members)
        out[members[0]] = sum((imp[p] / total) * features[p].double() for p in members)
    kept = sorted(out)
    return kept, [out[p] for p in kept]


def slow_holov(features: torch.Tensor, cls: list[float], n_keep: int, crops: int, alpha: float) -> list[int]:
    """HoloV (official code) from its description, one row: equal contiguous crops; per crop,
    similarity S_ij = cos(i, j) off the diagonal (0 on it), mu_i = sum_j S_ij / (M - 1),
    V_i = sum_j (S_ij - mu_i)^2 / (M - 1); score = 1000 A + alpha V mean|1000 A| / mean|V|; crop
    weight = its mean score over the sum of those; quota = floor(w N'), capped at the crop size,
    then one more at a time to the heaviest crops with room; top-quota by A inside each crop."""
    n = features.shape[0]
    size = n // crops
    weights, tops = [], []
    for c in range(crops):
        idx = list(range(c * size, (c + 1) * size))
        a = [1000 * cls[i] for i in idx]
        sim = [[0.0 if i == j else _cos(features[i].double(), features[j].double()) for j in idx] for i in idx]
        mu = [sum(row) / (size - 1) for row in sim]
        var = [sum((x - m) ** 2 for x in row) / (size - 1) for row, m in zip(sim, mu)]
        ratio = (sum(abs(x) for x in a) / size) / (sum(abs(v) for v in var) / size)
        score = [x + alpha * v * ratio for x, v in zip(a, var)]
        weights.append(sum(score) / size)
        tops.append(sorted(idx, key=lambda i: (-cls[i], i)))
    weights = [w / sum(weights) for w in weights]
    quota = [min(math.floor(w * n_keep), size) for w in weights]
    order = sorted(range(crops), key=lambda c: (-weights[c], c))
    while sum(quota) < n_keep:
        for c in order:
            if sum(quota) < n_keep and quota[c] < size:
                quota[c] += 1
    return sorted(i for c in range(crops) for i in tops[c][:quota[c]])


def slow_recycle(features: torch.Tensor, scores: list[float], n_keep: int, clusters: int, ratio: float,
                 neighbours: int) -> tuple[list[int], list[torch.Tensor]]:
    """SparseVLM recycling from its description, one row: the top n_keep - clusters by score stay;
    the deleted ones' best int(ratio * deleted) + 1 are clustered by DPC-kNN: d = euclidean / sqrt(D),
    density = exp(-mean of the squared distances to the k nearest, itself included), delta = distance
    to the nearest denser token (the largest distance when none), centres = the top `clusters` by
    density x delta, each token to its nearest centre; a cluster's mean sits at its centre."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    top, deleted = order[:n_keep - clusters], order[n_keep - clusters:]
    pool = deleted[:min(len(deleted), int(ratio * len(deleted)) + 1)]
    x = [features[p].double() for p in pool]
    d = [[float((a - c).norm()) / math.sqrt(features.shape[1]) for c in x] for a in x]
    k = min(neighbours, len(pool))
    density = [math.exp(-sum(v ** 2 for v in sorted(row)[:k]) / k) for row in d]
    largest = max(max(row) for row in d)
    delta = [min([d[i][j] for j in range(len(pool)) if density[j] > density[i]], default=largest)
             for i in range(len(pool))]
    centres = sorted(range(len(pool)), key=lambda i: (-density[i] * delta[i], i))[:clusters]
    members = {c: [] for c in centres}
    for i in range(len(pool)):
        owner = i if i in members else min(centres, key=lambda c: (d[i][c], centres.index(c)))
        members[owner].append(x[i])
    values = {p: features[p].double() for p in top}
    for c in centres:
        values[pool[c]] = sum(members[c]) / len(members[c])
    kept = sorted(values)
    return kept, [values[p] for p in kept]


def term_kinds(stage: dict) -> list[str]:
    return [t["method"] for t in stage["terms"]] if stage["kind"] == "fuse" else [stage["kind"]]


def term_params(stage: dict) -> list[dict]:
    return [t.get("params", {}) for t in stage["terms"]] if stage["kind"] == "fuse" else [stage]


def term_weights(stage: dict) -> list[float]:
    return [float(t.get("weight", 1.0)) for t in stage["terms"]]


class HookReference:
    """Runs an HF LLaVA or Llama (eager attention) with hooks applying DivPrune / FasterVLM before the
    LLM and/or FastV / PyramidDrop / TTV / IGA after decoder layer i, or a fusion of those scores.
    Candidates: LLaVA's image tokens; for Llama every token but the last. `stages`: dicts with kind
    ('divprune' | 'fastervlm' | 'fastv' | 'pyramiddrop' | 'ttv' | 'iga' | 'fuse'), n_keep, `layer`
    (None before the LLM), `positions` ('keep_original' | 'renumber'), and the method's params
    (fastv `query`; ttv `accumulate_from`, `cos`; fuse `fusion`, `normalize`, `terms`)."""

    def __init__(self, model, stages: list[dict]):
        self.model, self.stages = model, stages
        model.set_attn_implementation("eager")
        self.is_llava = hasattr(model.model, "language_model")
        self.lm = model.model.language_model if self.is_llava else model.model

    def _candidates(self, input_ids, pixel_values=None, image_sizes=None):
        if not self.is_llava:
            return [list(range(input_ids.shape[1] - 1)) for _ in input_ids]
        image_tokens = [torch.nonzero(r == self.model.config.image_token_id).flatten().tolist() for r in input_ids]
        if image_sizes is None:
            return image_tokens
        # LLaVA-NeXT: HF's own packed features; its newline rows (the image_newline vector) are not candidates
        config = self.model.config
        packed = torch.cat(self.model.model.get_image_features(
            pixel_values, image_sizes, vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy).pooler_output)
        newline = (packed == self.model.model.image_newline).all(dim=-1).tolist()
        flags = iter(newline)
        return [[p for p in row if not next(flags)] for row in image_tokens]

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask, pixel_values=None, cache=None, image_sizes=None):
        """Logits of the pruned forward. With a DynamicCache, each layer stores the K/V of the tokens
        it kept, `self.layer_masks[i]` is the 4-D mask layer i used, and `self.last_position[b]` is the
        rotary position row b's last token has in the last layer."""
        lm = self.lm
        self.layer_masks = {}
        state = {"cands": self._candidates(input_ids, pixel_values, image_sizes), "cur": None, "pending": None, "attn": None, "pos": None}
        state["patches"] = [list(range(len(c))) for c in state["cands"]]  # patch id of each candidate
        state["images"] = pixel_values.shape[0] // input_ids.shape[0] if pixel_values is not None else 1
        state["per_image"] = len(state["cands"][0]) // state["images"]
        self.kept = []  # per stage: the set of patch ids row 0 still holds

        def keep_patches(locals_per_row):
            state["patches"] = [[p[i] for i in local] for p, local in zip(state["patches"], locals_per_row)]
            self.kept.append(set(state["patches"][0]))
        handles = []

        def pre_llm_terms(stage, embeds, b, cands):
            """Each term's scores over row b's candidates (divprune: minus its pick step)."""
            rows = []
            for kind, params in zip(term_kinds(stage), term_params(stage)):
                if kind == "fastervlm":
                    rows.append([float(v) for v in state["vision_cls"][b]])
                elif kind == "vtc_cls":
                    layers = range(params["start_layer"], state["feature"] + 1)
                    rows.append([sum(float(state["vision"][i][b, :, 0].mean(dim=0)[j]) for i in layers)
                                 for j in range(state["lead"], state["vision"][0].shape[-1])])
                else:
                    order = slow_divprune_order(embeds[b, cands], len(cands))
                    rows.append([-float(order.index(i)) for i in range(len(cands))])
            return rows

        def choose_raters(embeds):
            """SparseVLM's raters from the definition, per row: text tokens after the image whose
            softmax-over-text relevance to the visual tokens, averaged over them, beats the mean."""
            state["raters"] = []
            for b, cands in enumerate(state["cands"]):
                text = list(range(max(cands) + 1, embeds.shape[1]))
                rel = [0.0] * len(text)
                for v in cands:
                    logits = [float(embeds[b, v].double() @ embeds[b, t].double()) for t in text]
                    top = max(logits)
                    total = sum(math.exp(x - top) for x in logits)
                    rel = [r + math.exp(x - top) / total / len(cands) for r, x in zip(rel, logits)]
                mean = sum(rel) / len(rel)
                state["raters"].append({t for t, r in zip(text, rel) if r > mean})

        def pre_llm(module, args, kwargs):
            embeds, mask = kwargs.get("inputs_embeds"), kwargs.get("attention_mask")
            stage = next((s for s in self.stages if s["layer"] is None), None)
            if stage is None:
                state["mask2d"] = mask
                if any(s["kind"] in ("sparsevlm", "sparsevlm_recycle") for s in self.stages):
                    choose_raters(embeds)
                return args, kwargs
            keep, locals_per_row = [], []
            for b, cands in enumerate(state["cands"]):
                lead = state.get("lead", 0)
                if stage["kind"] in ("aim_merge", "visionzip", "vflowopt"):
                    if stage["kind"] == "aim_merge":
                        kept, values = slow_aim_merge(embeds[b, cands], stage["n_keep"])
                    elif stage["kind"] == "vflowopt":
                        probs = state["vision"][stage.get("vision_layer", state["feature"])][b]
                        image = (pixel_values[b], stage["entropy_weight"])
                        kept, values = slow_vflowopt(embeds[b, cands], probs, stage["n_keep"], stage["threshold"],
                                                     stage["cell"], *image)
                        state.setdefault("importance", []).append(
                            slow_calibrated_importance(probs, len(cands), stage["threshold"], *image))  # by patch id
                    else:
                        feature = state["vision"][state["feature"]]
                        cls = feature[b, :, 0].sum(dim=0)[lead:].tolist()
                        keys = state["vision_keys"][b][lead:]
                        kept, values = slow_visionzip(embeds[b, cands], cls, keys, stage["n_keep"], stage["contextual"])
                    embeds = embeds.clone()
                    for local_index, value in zip(kept, values):
                        embeds[b, cands[local_index]] = value.to(embeds.dtype)
                    local = kept
                elif stage["kind"] == "divprune" and stage.get("scope") == "per_image":
                    local = per_image_pick(len(cands), state["images"], stage["n_keep"],
                                           lambda run, k: slow_divprune(embeds[b, [cands[i] for i in run]], k))
                elif stage["kind"] == "divprune":
                    local = slow_divprune(embeds[b, cands], stage["n_keep"])
                elif stage["kind"] == "pool":  # each image's grid, pooled values written at their slots
                    per, share = state["per_image"], stage["n_keep"] // state["images"]
                    rows, cols = stage.get("grid") or (math.isqrt(share), math.isqrt(share))
                    embeds, local = embeds.clone(), []
                    for m in range(state["images"]):
                        group = cands[m * per:(m + 1) * per]
                        slots, values = slow_pool(embeds[b, group], rows, cols, stage["mode"])
                        for slot, value in zip(slots, values):
                            embeds[b, group[slot]] = value.to(embeds.dtype)
                        local += [m * per + slot for slot in slots]
                elif stage["kind"] == "vispruner":  # one image per row: its [CLS] row and pre-projector states
                    importance = (state["vision_cls"][b].tolist() if stage["importance"] == "cls" else
                                  slow_received(state["vision"][state["feature"]][b])[state["lead"]:])
                    local = slow_vispruner(importance, state["vision_states"][b], stage["n_keep"],
                                           stage["important_ratio"], stage["per_round"])
                elif stage["kind"] == "evs":  # a row's images are its frames
                    local = slow_evs(embeds[b, cands], state["images"], stage["n_keep"])
                elif stage["kind"] == "cdpruner":  # the instruction: the row's tokens after its image
                    local = slow_cdpruner(embeds[b, cands], embeds[b, max(cands) + 1:], stage["n_keep"],
                                          stage["sign"])[1]
                elif stage["kind"] == "vidcom2":  # a row's images are its frames; base = the written ratio
                    kind, value = stage["keep_spec"]
                    base = value if kind == "ratio" else stage["n_keep"] / len(cands)
                    local = slow_vidcom2(embeds[b, cands], state["images"], stage["n_keep"], base)
                elif stage["kind"] == "random":
                    local = slow_random(len(cands), stage["n_keep"], stage["seed"])
                elif stage["kind"] == "catp":  # per image; its paired text: the tokens up to the next image
                    per, local = state["per_image"], []
                    for m in range(state["images"]):
                        group = cands[m * per:(m + 1) * per]
                        end = cands[(m + 1) * per] if m + 1 < state["images"] else embeds.shape[1]
                        text = embeds[b, group[-1] + 1:end]
                        local += [m * per + i for i in slow_catp(embeds[b, group], text if len(text) else None,
                                                                 stage["n_keep"] // state["images"],
                                                                 stage["alignment"])]
                elif stage["kind"] == "recoverable":  # the vision layer reading the features
                    layer = state["feature"] + 1
                    if stage["heads"] == "joint":
                        a = slow_joint_cls_attention(state["q_proj"][layer][b, 0], state["k_proj"][layer][b])
                    else:
                        a = state["vision"][layer][b, :, 0].mean(dim=0).tolist()
                    text = embeds[b, max(cands) + 1:]
                    local = slow_recoverable(embeds[b, cands], text if len(text) else None, a[lead:],
                                             stage["n_keep"], stage["neighbours"], stage.get("visual_share"))
                elif stage["kind"] == "todre":
                    first = 0 if stage["pivot"] == "first" else None
                    local = sorted(slow_divprune_order(embeds[b, cands], stage["n_keep"], first))
                elif stage["kind"] == "hiprune":
                    obj = slow_received(state["vision"][stage["object_layer"]][b])[lead:]
                    deep = slow_received(state["vision"][state["feature"]][b])[lead:]
                    local = slow_hiprune(obj, deep, stage["n_keep"], stage["alpha"])
                elif stage["kind"] == "holov":
                    cls = state["vision"][state["feature"]][b, :, 0].mean(dim=0)[lead:].tolist()
                    local = slow_holov(embeds[b, cands], cls, stage["n_keep"], stage["crops"], stage["alpha"])
                elif stage["kind"] == "fopru":
                    score = slow_received(state["vision"][state["feature"]][b])[lead:]
                    local = (slow_topk(score, stage["n_keep"]) if stage["strategy"] == "rank"
                             else slow_fopru_rows(score, stage["n_keep"]))
                else:
                    rows = pre_llm_terms(stage, embeds, b, cands)
                    fused = rows[0] if stage["kind"] != "fuse" else fuse_rows(
                        rows, term_weights(stage), stage["fusion"], stage["normalize"])
                    local = (per_image_pick(len(cands), state["images"], stage["n_keep"],
                                            lambda run, k: slow_topk([fused[i] for i in run], k))
                             if stage.get("scope") == "per_image" else slow_topk(fused, stage["n_keep"]))
                locals_per_row.append(local)
                keep.append(keep_list(cands, [cands[i] for i in local], embeds.shape[1]))
            keep_patches(locals_per_row)
            state["cands"] = [[k.index(c) for c in cands if c in k] for k, cands in zip(keep, state["cands"])]
            kwargs["inputs_embeds"] = _gather_rows(embeds, keep, 1)
            kwargs["attention_mask"] = state["mask2d"] = _gather_rows(mask, keep, 1)
            if any(s["kind"] in ("sparsevlm", "sparsevlm_recycle") for s in self.stages):
                choose_raters(kwargs["inputs_embeds"])
            return args, kwargs

        def capture_attn(module, args, output):
            state["attn"] = output[1]

        def cut(stage, rows=None, pools=None):
            """rows: [B, S] scores; by default FastV's, from the captured attention probabilities.
            pools: per row, the candidates (indices into state["cands"][b]) the stage selects among;
            the others stay (default: all)."""
            if rows is None:
                probs = state["attn"].float().mean(dim=1)  # [B, S, S], head mean
                rows = probs[:, -1] if stage["query"] == "last" else probs.mean(dim=1)
            keep, locals_per_row = [], []
            for b, cands in enumerate(state["cands"]):
                row = rows[b]
                pool = pools[b] if pools is not None else list(range(len(cands)))
                n_keep = stage["n_keep"] - (len(cands) - len(pool))
                if stage.get("scope") == "per_image":
                    chosen = per_image_pick(len(cands), state["images"], n_keep,
                                            lambda run, k: slow_topk([float(row[cands[i]]) for i in run], k))
                else:
                    chosen = [pool[i] for i in slow_topk([float(row[cands[i]]) for i in pool], n_keep)]
                local = sorted(set(range(len(cands))) - set(pool) | set(chosen))
                locals_per_row.append(local)
                keep.append(keep_list(cands, [cands[i] for i in local], rows.shape[-1]))
            keep_patches(locals_per_row)
            state["cands"] = [[k.index(c) for c in cands if c in k] for k, cands in zip(keep, state["cands"])]
            for summed in ("ttv", "spatten"):
                if state[summed] is not None:
                    state[summed] = _gather_rows(state[summed], keep, 1)
            prev = state["cur"] or [list(range(rows.shape[-1])) for _ in keep]
            state["cur"] = [[p[i] for i in k] for p, k in zip(prev, keep)]
            state["pending"] = (keep, rows.shape[-1])
            # each row's rotary position per token: kept as they were, or renumbered 0..K-1
            positions = state["pos"] or [list(range(rows.shape[-1])) for _ in keep]
            if stage["positions"] == "renumber":
                state["pos"] = [list(range(len(k))) for k in keep]
            else:
                state["pos"] = [[p[i] for i in k] for p, k in zip(positions, keep)]

        def recycle(stage, rows, hidden):
            """SparseVLM with recycling: a cut whose kept cluster tokens carry merged values."""
            merged, picks = [], []
            for b, cands in enumerate(state["cands"]):
                kept, values = slow_recycle(hidden[b, cands], [float(rows[b, c]) for c in cands], stage["n_keep"],
                                            stage["clusters"], stage["ratio"], stage.get("neighbours", stage["clusters"]))
                merged.append({cands[i]: v for i, v in zip(kept, values)})
                picks.append(kept)
            forced = torch.full(rows.shape, -1.0, dtype=torch.float64)
            for b, (cands, kept) in enumerate(zip(state["cands"], picks)):
                forced[b, [cands[i] for i in kept]] = 1.0  # cut keeps exactly these candidates
            cut(stage, forced)
            state["merged"] = merged

        def image_of(b):
            """The image each of row b's current candidates belongs to (its patch id // per image)."""
            return [p // state["per_image"] for p in state["patches"][b]]

        def catp_stage2(stage, hidden):
            """CATP stage 2 from the paper: the demonstration images' tokens (catp_context) or the
            query image's (catp_query) by their scores; the other image tokens stay."""
            out = torch.zeros(hidden.shape[:2], dtype=torch.float64)
            pools = []
            for b, cands in enumerate(state["cands"]):
                images = image_of(b)
                query = [i for i, m in enumerate(images) if m == state["images"] - 1]
                context = [i for i, m in enumerate(images) if m < state["images"] - 1]
                h = hidden[b].double()
                valid = valid_now(b, hidden.shape[1])
                if stage["kind"] == "catp_context":
                    last = hidden.shape[1] - 1
                    now, before = (state["probs"][stage["layer"] - d][b].double().mean(dim=0)[last] for d in (0, 1))
                    sample = [t for t in range(cands[query[0]], hidden.shape[1]) if valid[t]]
                    target = h[sample].mean(dim=0)
                    for i in context:
                        c = cands[i]
                        out[b, c] = max(0.0, float(now[c] - before[c])) + stage["similarity"] * _cos(h[c], target)
                    pools.append(context)
                else:
                    target = h[[cands[i] for i in context]].mean(dim=0) if context else torch.zeros(h.shape[1])
                    for i in query:
                        out[b, cands[i]] = _cos(h[cands[i]], target) if context else 0.0
                    pools.append(query)
            cut(stage, out, pools)

        def before_layer(index):
            def hook(module, args, kwargs):
                for stage in self.stages:
                    if stage["kind"] in ("catp_context", "catp_query") and stage["layer"] == index - 1:
                        catp_stage2(stage, args[0] if args else kwargs["hidden_states"])
                    if stage["kind"] == "vflowopt_llm" and stage["layer"] == index - 1:  # the vision importance
                        hidden = args[0] if args else kwargs["hidden_states"]
                        rows = torch.zeros(hidden.shape[:2], dtype=torch.float64)
                        for b, cands in enumerate(state["cands"]):
                            for c, patch in zip(cands, state["patches"][b]):
                                rows[b, c] = state["importance"][b][patch]
                        cut(stage, rows)
                    if stage["kind"] == "fastv" and stage["layer"] == index - 1:
                        cut(stage)
                    if stage["kind"] == "dart" and stage["layer"] == index - 1:
                        dart(stage, args[0] if args else kwargs["hidden_states"])
                    if stage["kind"] == "random" and stage["layer"] == index - 1:
                        hidden = args[0] if args else kwargs["hidden_states"]
                        rows = torch.zeros(hidden.shape[:2], dtype=torch.float64)
                        for b, cands in enumerate(state["cands"]):
                            rows[b, [cands[i] for i in slow_random(len(cands), stage["n_keep"], stage["seed"])]] = 1.0
                        cut(stage, rows)
                    if stage["kind"] == "sparsevlm_recycle" and stage["layer"] == index - 1:
                        recycle(stage, site_rows(stage), args[0] if args else kwargs["hidden_states"])
                    elif stage["kind"] in SITE_KINDS and stage["layer"] == index - 1:
                        cut(stage, site_rows(stage))
                    if stage["kind"] in ("pyramiddrop", "ttv", "iga", "fuse") and stage["layer"] == index - 1:
                        cut(stage, in_llm_rows(stage, module, args[0] if args else kwargs["hidden_states"], kwargs))
                if state["pending"] is not None:
                    keep, length = state["pending"]
                    hidden = args[0] if args else kwargs["hidden_states"]
                    if hidden.shape[1] == length and state.get("merged"):
                        hidden = hidden.clone()
                        for b, values in enumerate(state.pop("merged")):
                            for position, value in values.items():
                                hidden[b, position] = value.to(hidden.dtype)
                    if hidden.shape[1] == length:
                        hidden = _gather_rows(hidden, keep, 1)
                        args = (hidden, *args[1:]) if args else args
                        if not args:
                            kwargs["hidden_states"] = hidden
                if state["cur"] is not None and "attention_mask" in kwargs:
                    cur = state["cur"]
                    mask = kwargs["attention_mask"]
                    kwargs["attention_mask"] = _gather_rows(_gather_rows(mask, cur, 2), cur, 3)
                    cos, sin = kwargs["position_embeddings"]  # rows = positions 0..S-1 of the LLM input
                    pos = state["pos"]
                    kwargs["position_embeddings"] = (_gather_rows(cos, pos, 1), _gather_rows(sin, pos, 1))
                    kwargs["position_ids"] = None
                self.layer_masks[index] = kwargs["attention_mask"]
                if any(s["kind"] == "dart" and s["layer"] == index for s in self.stages):
                    cos, sin = kwargs["position_embeddings"]
                    state["dart_input"] = (args[0] if args else kwargs["hidden_states"], cos, sin)
                return args, kwargs
            return hook

        def dart(stage, hidden):
            """DART before layer K: layer K-1's post-RoPE keys recomputed from its input, the hidden
            states through the final norm."""
            layer_input, cos, sin = state["dart_input"]
            layer = lm.layers[stage["layer"]]
            x = layer.input_layernorm(layer_input)
            k = layer.self_attn.k_proj(x).view(*x.shape[:2], -1, layer.self_attn.head_dim).transpose(1, 2)
            k = _rotate(k, cos[:, None], sin[:, None])
            key_l1 = k.double().abs().sum(dim=(1, 3))  # [B, S]
            normed = lm.norm(hidden)
            pivots = stage["pivots_image"] + stage["pivots_text"]
            per_pivot = (stage["n_keep"] - stage["pivots_image"]) // pivots
            rows = torch.zeros(hidden.shape[:2], dtype=torch.float64)
            for b, cands in enumerate(state["cands"]):
                first = valid_now(b, hidden.shape[1]).index(True)
                image = [c - first for c in cands]
                query = list(range(max(image) + 1, hidden.shape[1] - first))
                kept = slow_dart(key_l1[b, first:].tolist(), normed[b, first:], image, query, stage["pivots_image"],
                                 stage["pivots_text"], per_pivot)
                rows[b, [p + first for p in kept]] = 1.0
            cut(stage, rows)

        def current_view(kwargs):
            """The layer's 4-D mask and cos/sin, cut to the tokens the rows still hold."""
            mask = kwargs["attention_mask"]
            cos, sin = kwargs["position_embeddings"]
            if state["cur"] is None:
                return mask, cos, sin
            mask = _gather_rows(_gather_rows(mask, state["cur"], 2), state["cur"], 3)
            return mask, _gather_rows(cos, state["pos"], 1), _gather_rows(sin, state["pos"], 1)

        def next_layer_view(hidden, kwargs):
            mask, cos, sin = current_view(kwargs)
            if cos.shape[0] != hidden.shape[0]:
                cos, sin = cos.expand(hidden.shape[0], -1, -1), sin.expand(hidden.shape[0], -1, -1)
            return mask, cos, sin

        def in_llm_rows(stage, layer, hidden, kwargs):
            """[B, S] scores of a stage scored at the start of `layer` (the site's next layer)."""
            mask, cos, sin = next_layer_view(hidden, kwargs)
            term_rows = []
            for kind in term_kinds(stage):
                if kind == "pyramiddrop":
                    last = [[hidden.shape[1] - 1] for _ in range(hidden.shape[0])]  # the last token's row
                    term_rows.append(next_layer_rows(layer, hidden, cos, sin, mask, last))
                elif kind == "iga":  # queries: the tokens after each row's last candidate
                    queries = [list(range(max(c) + 1, hidden.shape[1])) for c in state["cands"]]
                    term_rows.append(next_layer_rows(layer, hidden, cos, sin, mask, queries))
                else:
                    term_rows.append(state["ttv"])
            if stage["kind"] != "fuse":
                return term_rows[0]
            out = torch.zeros(hidden.shape[:2], dtype=torch.float64)
            for b, cands in enumerate(state["cands"]):
                fused = fuse_rows([[float(r[b, c]) for c in cands] for r in term_rows], term_weights(stage),
                                  stage["fusion"], stage["normalize"])
                out[b, cands] = torch.tensor(fused, dtype=torch.float64)
            return out

        def valid_now(b, length):
            tokens = state["cur"][b] if state["cur"] is not None else list(range(length))
            return [bool(state["mask2d"][b, t]) for t in tokens]

        def keep_probs(index):
            def hook(module, args, output):
                probs = state["probs"][index] = output[1]
                if spatten_first <= index <= spatten_last:
                    layer = torch.tensor([slow_spatten_layer(probs[b], valid_now(b, probs.shape[-1]))
                                          for b in range(probs.shape[0])], dtype=torch.float64)
                    state["spatten"] = layer if state["spatten"] is None else state["spatten"] + layer
            return hook

        def site_rows(stage):
            """[B, S] scores of a stage scored from its own layer's attention probabilities."""
            probs = state["probs"][stage["layer"]]
            out = torch.zeros(probs.shape[0], probs.shape[-1], dtype=torch.float64)
            for b in range(probs.shape[0]):
                valid = valid_now(b, probs.shape[-1])
                if stage["kind"] == "spatten":
                    row = state["spatten"][b].tolist()
                elif stage["kind"] == "aim":
                    row = slow_aim(probs[b], valid, stage["temperature"], stage["iterations"])
                elif stage["kind"] == "a2sf":
                    row = slow_a2sf(probs[b], valid, stage["forgetting"], stage["recent"], state["cands"][b])
                elif stage["kind"] in ("sparsevlm", "sparsevlm_recycle"):  # head mean, mean over raters
                    tokens = state["cur"][b] if state["cur"] is not None else list(range(probs.shape[-1]))
                    rows = [i for i, t in enumerate(tokens) if t in state["raters"][b]]
                    row = (probs[b].double().mean(dim=0)[rows].mean(dim=0).tolist() if rows
                           else [0.0] * probs.shape[-1])
                else:  # lazyllm: the last token's row, head mean
                    row = probs[b].double().mean(dim=0)[-1].tolist()
                out[b] = torch.tensor(row, dtype=torch.float64)
            return out

        blocks = {}

        def keep_block(name):
            def hook(module, args, output):
                blocks[name] = output[0] if isinstance(output, tuple) else output
            return hook

        def sum_transitions(index):
            def hook(module, args, output):
                blocks["mlp"] = output
                if not ttv_first <= index <= ttv_last:
                    return
                length = output.shape[1]
                rows = []
                for b in range(output.shape[0]):
                    valid = valid_now(b, length)
                    attn = slow_ttv(blocks["input_layernorm"][b], blocks["self_attn"][b], valid, ttv_abs)
                    ffn = slow_ttv(blocks["post_attention_layernorm"][b], output[b], valid, ttv_abs)
                    rows.append([x + y for x, y in zip(attn, ffn)])
                layer_ttv = torch.tensor(rows, dtype=torch.float64)
                state["ttv"] = layer_ttv if state["ttv"] is None else state["ttv"] + layer_ttv
            return hook

        def before_norm(module, args):
            for stage in self.stages:
                if stage["kind"] == "fastv" and stage["layer"] == len(lm.layers) - 1:
                    cut(stage)
                if stage["kind"] in SITE_KINDS and stage["layer"] == len(lm.layers) - 1:
                    cut(stage, site_rows(stage))
            if state["pending"] is not None and args[0].shape[1] == state["pending"][1]:
                return (_gather_rows(args[0], state["pending"][0], 1),)
            return None

        ttv_stages = [(s["layer"], params) for s in self.stages for kind, params in zip(term_kinds(s), term_params(s))
                      if kind == "ttv"]
        ttv_first = min((p.get("accumulate_from", layer) for layer, p in ttv_stages), default=0)
        ttv_last = max((layer for layer, _ in ttv_stages), default=-1)
        ttv_abs = any(p.get("cos") == "abs" for _, p in ttv_stages)
        state["ttv"] = state["spatten"] = None
        state["probs"] = {}
        spatten = [(s["layer"], s.get("accumulate_from", s["layer"])) for s in self.stages if s["kind"] == "spatten"]
        spatten_first = min((first for _, first in spatten), default=0)
        spatten_last = max((layer for layer, _ in spatten), default=-1)
        if any(s["layer"] is None and k not in ("divprune", "aim_merge") for s in self.stages for k in term_kinds(s)):
            key_hooks = [getattr(layer.self_attn, name).register_forward_hook(
                lambda m, a, out, i=i, name=name: state.setdefault(name, {}).__setitem__(i, out))
                for i, layer in enumerate(self.model.model.vision_tower.encoder.layers) for name in ("q_proj", "k_proj")]
            try:
                crops = pixel_values
                if image_sizes is not None:  # LLaVA-NeXT: every image's real crops, in order
                    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

                    counts = [image_size_to_num_patches(size, self.model.config.image_grid_pinpoints,
                                                        self.model.config.vision_config.image_size)
                              for size in image_sizes.tolist()]
                    crops = torch.cat([pixel_values[i, :n] for i, n in enumerate(counts)])
                vision = self.model.model.vision_tower(crops, output_attentions=True, output_hidden_states=True)
            finally:
                for h in key_hooks:
                    h.remove()
            feature = self.model.config.vision_feature_layer  # hidden_states[h] is layer h-1's output
            feature = (feature if feature < 0 else feature - 1) % len(vision.attentions)
            lead = 1 if self.model.config.vision_feature_select_strategy == "default" else 0
            state["vision"] = [a.double() for a in vision.attentions]  # per layer [B, H, S, S]
            state["feature"], state["lead"] = feature, lead
            # what the projector reads: hidden_states[vision_feature_layer], patches only
            state["vision_states"] = vision.hidden_states[self.model.config.vision_feature_layer][:, lead:]
            # per row: its images' [CLS] rows one after another (pixel_values holds a row's images in order)
            state["vision_cls"] = state["vision"][feature][:, :, 0].mean(dim=1)[:, lead:].reshape(input_ids.shape[0], -1)
            if image_sizes is not None:
                # each crop's [CLS] row over its patches, packed as HF packs features (a 1-wide "feature"
                # with a NaN newline, dropped: newline tokens are not candidates), the row's images in order
                per_crop = state["vision"][feature][:, :, 0].mean(dim=1)[:, lead:, None]
                packed = self.model.model.pack_image_features(
                    list(per_crop.split(counts)), image_sizes, self.model.config.vision_feature_select_strategy,
                    image_newline=torch.full((1,), float("nan"), dtype=per_crop.dtype))[0]
                values = [v for image in packed for v in image[:, 0].tolist() if v == v]
                assert input_ids.shape[0] == 1, "the NeXT reference runs one row at a time"
                state["vision_cls"] = torch.tensor([values], dtype=torch.float64)
            # head-mean keys of the feature layer: the k projection split into heads, then averaged
            k_proj = state["k_proj"][feature]
            heads = self.model.config.vision_config.num_attention_heads
            state["vision_keys"] = k_proj.view(*k_proj.shape[:2], heads, -1).mean(dim=2)
        try:
            handles.append(lm.register_forward_pre_hook(pre_llm, with_kwargs=True))
            for stage in self.stages:
                if stage["kind"] == "fastv":
                    handles.append(lm.layers[stage["layer"]].self_attn.register_forward_hook(capture_attn))
            for i, layer in enumerate(lm.layers):
                handles.append(layer.register_forward_pre_hook(before_layer(i), with_kwargs=True))
                if any(s["kind"] in (*SITE_KINDS, "catp_context") for s in self.stages):
                    handles.append(layer.self_attn.register_forward_hook(keep_probs(i)))
                if ttv_stages:
                    for name in ("input_layernorm", "self_attn", "post_attention_layernorm"):
                        handles.append(getattr(layer, name).register_forward_hook(keep_block(name)))
                    handles.append(layer.mlp.register_forward_hook(sum_transitions(i)))
            handles.append(lm.norm.register_forward_pre_hook(before_norm))
            images = {"pixel_values": pixel_values} if self.is_llava else {}
            if image_sizes is not None:
                images["image_sizes"] = image_sizes
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                                use_cache=cache is not None, **images).logits
            length = self.layer_masks[0].shape[-1]  # tokens entering the LLM
            # which LLM-input tokens each row still holds at the end (for in-LLM cuts)
            self.final_tokens = state["cur"] or [list(range(length)) for _ in range(input_ids.shape[0])]
            self.last_position = ([p[-1] for p in state["pos"]] if state["pos"] is not None
                                  else [length - 1] * input_ids.shape[0])
            return logits
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixel_values=None, *, max_new_tokens: int, image_sizes=None):
        """Greedy decoding with HF's own DynamicCache: prune at prefill (static policy), then feed one
        token at a time through the decoder layers, each against the keys it kept, the new token at
        the position after the last token's final one. Returns (token ids [B, T], logits [B, T, V])."""
        from transformers import DynamicCache

        lm = self.lm
        cache = DynamicCache(config=self.model.config)
        logits = self(input_ids, attention_mask, pixel_values, cache=cache, image_sizes=image_sizes)[:, -1]
        # per layer: keys row b may attend (the last query's row of the mask the layer used)
        valid = {}
        for i, mask in self.layer_masks.items():
            row = mask[:, 0, -1]
            valid[i] = (row if row.dtype == torch.bool else row == 0).expand(input_ids.shape[0], -1)
        position = torch.tensor(self.last_position)[:, None] + 1
        tokens, scores = [], []
        for _ in range(max_new_tokens):
            scores.append(logits)
            token = logits.argmax(-1)
            tokens.append(token)
            valid = {i: torch.cat([v, torch.ones_like(v[:, :1])], dim=1) for i, v in valid.items()}
            embeds = lm.embed_tokens(token[:, None])
            cos_sin = lm.rotary_emb(embeds, position_ids=position)

            def per_layer(index):
                def hook(module, args, kwargs):
                    additive = torch.zeros(valid[index].shape, dtype=embeds.dtype)
                    additive[~valid[index]] = torch.finfo(embeds.dtype).min
                    kwargs["attention_mask"] = additive[:, None, None, :]
                    kwargs["position_embeddings"] = cos_sin
                    return args, kwargs
                return hook
            handles = [layer.register_forward_pre_hook(per_layer(i), with_kwargs=True) for i, layer in enumerate(lm.layers)]
            try:
                hidden = lm(inputs_embeds=embeds, past_key_values=cache, use_cache=True).last_hidden_state
            finally:
                for h in handles:
                    h.remove()
            logits = self.model.lm_head(hidden)[:, -1]
            position = position + 1
        return torch.stack(tokens, dim=1), torch.stack(scores, dim=1)


class VisionReference:
    """HF vision encoder with a DivPrune cut after encoder layer `layer` (or on its output when
    layer is None), over the patch tokens ([CLS] and registers protected)."""

    def __init__(self, model, layers, layer: int | None, n_keep: int, leading: int, interpolate: bool):
        self.model, self.layers, self.layer, self.n_keep = model, layers, layer, n_keep
        self.leading, self.interpolate = leading, interpolate

    def _select(self, hidden):
        keep = []
        for b in range(hidden.shape[0]):
            cands = list(range(self.leading, hidden.shape[1]))
            local = slow_divprune(hidden[b, cands], self.n_keep)
            keep.append(keep_list(cands, [cands[i] for i in local], hidden.shape[1]))
        return _gather_rows(hidden, keep, 1)

    @torch.no_grad()
    def __call__(self, pixel_values):
        extra = {"interpolate_pos_encoding": True} if self.interpolate else {}
        if self.layer is None:
            return self._select(self.model(pixel_values=pixel_values, **extra).last_hidden_state)
        handle = self.layers[self.layer].register_forward_hook(lambda m, a, out: self._select(out))
        try:
            return self.model(pixel_values=pixel_values, **extra).last_hidden_state
        finally:
            handle.remove()


def slow_tome(hidden: torch.Tensor, size: list[float], keys: torch.Tensor, leading: int, n_keep: int):
    """ToMe from its description, one image: candidates are the tokens after the `leading` ones; A
    = even positions, B = odd; each A's most similar B by key cosine (ties: lower index); the r = |candidates| -
    n_keep A tokens with the best matches (ties: lower index) merge into their partners as the
    size-weighted mean, sizes adding up. Returns (kept positions, their values, their sizes)."""
    seq = hidden.shape[0]
    a_set = [p for p in range(leading, seq) if p % 2 == 0]
    b_set = [p for p in range(leading, seq) if p % 2 == 1]
    edges = []
    for i, a in enumerate(a_set):
        sims = [_cos(keys[a].double(), keys[b].double()) for b in b_set]
        j = max(range(len(b_set)), key=lambda j: (sims[j], -j))
        edges.append((sims[j], i, b_set[j]))
    r = (seq - leading) - n_keep
    merged = sorted(edges, key=lambda e: (-e[0], e[1]))[:r]
    values = {p: hidden[p].double() * size[p] for p in range(seq)}
    sizes = dict(enumerate(size))
    for _, i, dst in merged:
        values[dst] = values[dst] + values[a_set[i]]
        sizes[dst] += sizes[a_set[i]]
    gone = {a_set[i] for _, i, _ in merged}
    kept = [p for p in range(seq) if p not in gone]
    return kept, [values[p] / sizes[p] for p in kept], [sizes[p] for p in kept]


def slow_flow_score(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, leading: int) -> list[float]:
    """FlowCut's per-layer score from its description, one image: q/k/v [S, H * hd] projections;
    relation a_j = mean_h softmax_j(q_CLS k_j / sqrt(hd)), semantic s_j = mean_h softmax_j(v_CLS v_j),
    score_j = (a_j / sum a + s_j / sum s) * |mean_h v_j|_1 over the candidates (0 for the leading)."""
    seq, width = q.shape
    hd = width // heads

    def head_softmax_row(x, y, scale):
        rows = []
        for h in range(heads):
            logits = [float(x[0, h * hd:(h + 1) * hd].double() @ y[j, h * hd:(h + 1) * hd].double()) * scale
                      for j in range(seq)]
            top = max(logits)
            total = sum(math.exp(t - top) for t in logits)
            rows.append([math.exp(t - top) / total for t in logits])
        return [sum(r[j] for r in rows) / heads for j in range(seq)]

    relation = head_softmax_row(q, k, hd ** -0.5)
    semantic = head_softmax_row(v, v, 1.0)
    cands = range(leading, seq)
    sum_a, sum_s = sum(relation[j] for j in cands), sum(semantic[j] for j in cands)
    mean_v = v.double().view(seq, heads, hd).mean(dim=1)
    return [0.0 if j < leading else (relation[j] / sum_a + semantic[j] / sum_s) * float(mean_v[j].abs().sum())
            for j in range(seq)]


class VisionStagesReference:
    """HF vision encoder (eager attention) with cuts after encoder layers, each keeping the top
    `n_keep` patches by `score(probs, b)` or the patches `select(probs, b)` names (probs: every
    layer's [B, H, S, S] attention so far, by layer), or (kind 'tome') merging by ToMe with
    proportional attention in later layers; [CLS] and registers (the first `leading` tokens) are
    protected."""

    def __init__(self, model, layers, stages: list[dict], leading: int, interpolate: bool):
        model.set_attn_implementation("eager")
        self.model, self.layers, self.stages = model, layers, stages
        self.leading, self.interpolate = leading, interpolate

    @torch.no_grad()
    def __call__(self, pixel_values):
        probs, keys, state = {}, {}, {"size": None}
        handles = []

        def keep_probs(index):
            def hook(module, args, output):
                probs[index] = output[1]
            return hook

        def keep_keys(index):
            def hook(module, args, output):  # k projection [B, S, H * hd] -> head mean [B, S, hd]
                heads = self.model.config.num_attention_heads
                keys[index] = output.view(*output.shape[:2], heads, -1).mean(dim=2)
            return hook

        def proportional(module, args):
            if state["size"] is None:
                return None
            bias = torch.log(torch.tensor(state["size"], dtype=args[0].dtype))[:, None, None, :]
            return (args[0], bias, *args[2:])

        def merge(stage):
            def hook(module, args, output):
                rows, sizes = [], []
                for b in range(output.shape[0]):
                    size = state["size"][b] if state["size"] is not None else [1.0] * output.shape[1]
                    kept, values, new = slow_tome(output[b], size, keys[stage["layer"]][b], self.leading,
                                                  stage["n_keep"])
                    rows.append(torch.stack(values).to(output.dtype))
                    sizes.append(new)
                state["size"] = sizes
                return torch.stack(rows)
            return hook

        flow = [s for s in self.stages if s["kind"] == "flowcut"]
        flow_first = min((s.get("accumulate_from", s["layer"]) for s in flow), default=0)
        flow_last = max((s["layer"] for s in flow), default=-1)
        projections = {}

        def keep_projection(index, name):
            def hook(module, args, output):
                projections[(index, name)] = output
            return hook

        def flow_layer(index):
            def hook(module, args, output):  # after layer index's attention: its score, then the EMA
                heads = self.model.config.num_attention_heads
                rows = [slow_flow_score(*(projections[(index, n)][b] for n in ("q_proj", "k_proj", "v_proj")),
                                        heads, self.leading) for b in range(output[0].shape[0])]
                score = torch.tensor(rows, dtype=torch.float64)
                state["flow"] = score if state.get("flow") is None else 0.5 * state["flow"] + 0.5 * score
            return hook

        def flow_cut(stage):
            def hook(module, args, output):
                keep = []
                for b in range(output.shape[0]):
                    cands = list(range(self.leading, output.shape[1]))
                    local = slow_topk([float(state["flow"][b, c]) for c in cands], stage["n_keep"])
                    keep.append(keep_list(cands, [cands[i] for i in local], output.shape[1]))
                state["flow"] = _gather_rows(state["flow"], keep, 1)
                return _gather_rows(output, keep, 1)
            return hook

        def cut(stage):
            if stage["kind"] == "tome":
                return merge(stage)
            if stage["kind"] == "flowcut":
                return flow_cut(stage)

            def hook(module, args, output):
                keep = []
                for b in range(output.shape[0]):
                    cands = list(range(self.leading, output.shape[1]))
                    if "select" in stage:  # candidate-local indices from the layers' maps (and keys)
                        local = stage["select"](probs, keys, b)
                    else:
                        scores = stage["score"](probs, b)
                        local = slow_topk([scores[c] for c in cands], stage["n_keep"])
                    keep.append(keep_list(cands, [cands[i] for i in local], output.shape[1]))
                return _gather_rows(output, keep, 1)
            return hook

        try:
            for index, layer in enumerate(self.layers):  # every layer's map: methods may read earlier ones
                handles.append(layer.attention.register_forward_hook(keep_probs(index)))
            for stage in self.stages:
                layer = self.layers[stage["layer"]]
                handles.append(layer.attention.k_proj.register_forward_hook(keep_keys(stage["layer"])))
                handles.append(layer.register_forward_hook(cut(stage)))
            for index in range(flow_first, flow_last + 1):
                attention = self.layers[index].attention
                for name in ("q_proj", "k_proj", "v_proj"):
                    handles.append(getattr(attention, name).register_forward_hook(keep_projection(index, name)))
                handles.append(attention.register_forward_hook(flow_layer(index)))
            if any(s["kind"] == "tome" and s["proportional_attention"] for s in self.stages):
                for layer in self.layers:
                    handles.append(layer.attention.register_forward_pre_hook(proportional))
            extra = {"interpolate_pos_encoding": True} if self.interpolate else {}
            return self.model(pixel_values=pixel_values, **extra).last_hidden_state
        finally:
            for h in handles:
                h.remove()


class EncoderStagesReference:
    """HF BERT (eager attention) with cuts after encoder layers: each keeps the first `leading`
    tokens ([CLS] when protected) and the candidates `stage["pick"](probs, hidden, real, b)` names
    (candidate-local indices; probs: every layer's [B, H, S, S] attention so far, real: [B, S] bool
    of the current tokens). Later layers get the attention mask gathered on its token axes; the
    output is pooled as the wrapper says ('mean': over the kept real tokens)."""

    def __init__(self, model, stages: list[dict], leading: int, pooling: str):
        model.set_attn_implementation("eager")
        self.model, self.stages, self.leading, self.pooling = model, stages, leading, pooling

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask):
        seq = input_ids.shape[1]
        probs, state = {}, {"kept": [list(range(seq)) for _ in range(input_ids.shape[0])]}
        layers = self.model.encoder.layer

        def real():
            return _gather_rows(attention_mask.bool(), state["kept"], 1)

        def keep_probs(index):
            def hook(module, args, output):
                probs[index] = output[1]
            return hook

        def cut(stage):
            def hook(module, args, output):
                keep, now = [], real()
                for b in range(output.shape[0]):
                    cands = list(range(self.leading, output.shape[1]))
                    local = stage["pick"](probs, output, now, b)
                    keep.append(keep_list(cands, [cands[i] for i in local], output.shape[1]))
                state["kept"] = [[state["kept"][b][p] for p in row] for b, row in enumerate(keep)]
                return _gather_rows(output, keep, 1)
            return hook

        def gather_mask(module, args):  # the layer's mask, on the tokens kept so far
            mask = args[1]
            if mask is None:  # HF skips the mask when nothing is padded
                return None
            for dim in range(2, mask.ndim):
                if mask.shape[dim] == seq:
                    mask = _gather_rows(mask, state["kept"], dim)
            return (args[0], mask, *args[2:])

        handles = []
        try:
            for index, layer in enumerate(layers):
                handles.append(layer.attention.register_forward_hook(keep_probs(index)))
                handles.append(layer.register_forward_pre_hook(gather_mask))
            for stage in self.stages:
                handles.append(layers[stage["layer"]].register_forward_hook(cut(stage)))
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        finally:
            for h in handles:
                h.remove()
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "mean":
            rows = [hidden[b, real()[b]].mean(dim=0) for b in range(hidden.shape[0])]
            return torch.stack(rows)
        return hidden

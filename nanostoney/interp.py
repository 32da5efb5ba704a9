"""Interpretability: which attention heads a model uses to answer, and how that differs between
reasoning over Stoney Nakoda and reasoning over math.

Everything is measured at one place, the *answer position*: the task prompt rendered with
`tokenizer.render_prompt`, then the gold assistant text up to the answer, so the next token is
the answer's first token (for multiple choice, the letter). The gold text is tokenized as the
model saw it in training, so the scored token is the gold's own first answer token (" E", with
the space BPE attaches to it); the context is every token before it, "... Answer:" included.
The model reads the gold rationale first (teacher forcing): the statistics describe how it
gets from question + rationale to the answer. `rationale="empty"` replaces the rationale by
"<think></think>" to ask for the answer straight from the question instead.

Statistics (each per example, then a mean with a bootstrap 95% interval over examples, for
the train split and for held-out items (val + test) separately; see DEFINITIONS):
- attention entropy per layer and head, over all query positions and at the answer position
- attention mass from the answer position onto labelled regions of the context: structure
  (bos, template, system, question, options, rest of the prompt, rationale, answer cue) and
  lexical (Stoney-term words, English words, digits, operators, other)
- head roles: previous-token, induction (on repeated random tokens), attention sink, option
  lookup
- logit lens: log-prob and rank of the answer token read from every layer's residual stream
- head ablation: the drop in the answer's log-prob when one head (or the top-k heads) is
  zeroed or replaced by its mean output

Probes come from nanostoney.probes; our own (ItemProbe, PatternProbe, RowAblate) subclass
probes.Probe, so one forward collects every statistic of a prompt, and ablations run batched,
one ablation per batch row, each row starting from the clean residual stream at the first
layer it ablates (blocks before it cannot change).
"""
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from nanostoney import probes
from nanostoney.answers import LETTERS, MARKER
from nanostoney.dist import get_rank, map_over_ranks
from nanostoney.errors import UserError
from nanostoney.gpt import unwrap
from nanostoney.metrics import bootstrap_means
from nanostoney.tasks.stoney import WORD_RE, Lang, load_corpus
from nanostoney.tokenizer import SYSTEM_JOIN

STRUCT_REGIONS = ("bos", "template", "system", "question", "options", "prompt_other", "rationale", "answer_cue")
LEXICAL_REGIONS = ("stoney_term", "english", "digit", "operator", "other")
SPLIT_GROUPS = ("train", "heldout")
ABLATION_MODES = ("zero", "mean")
ROLE_THRESHOLDS = {"previous_token": 0.5, "induction": 0.3, "sink": 0.5, "option_lookup": 0.3}
OPERATOR_CHARS = set("+-−*×÷/=^%<>")

DEFINITIONS = {
    "answer_position": "the prompt (tokenizer.render_prompt) followed by the gold assistant text up to its first "
                       "answer token; statistics are read where the model predicts that token.",
    "answer_logprob": "log-probability (nats) of the gold answer's first token at the answer position.",
    "accuracy": "multiple choice: the correct letter has the highest logit among the five letters; open answers "
                "(and MC when the tokenizer does not give the five letters as single tokens in that place): the "
                "gold first token is the model's top-1 token.",
    "entropy": "attention entropy in nats, -sum_j p_j log p_j, averaged over every query position of the context "
               "(position 0, which sees only itself, counts as 0); exact (probes.attention_entropy_probe).",
    "entropy_answer": "attention entropy (nats) of the answer position's query; log(T) would be uniform over the "
                      "T context tokens.",
    "entropy_norm": "entropy as a share of its maximum, H_i / log(i + 1), averaged over query positions i >= 1: "
                    "free of the growth of entropy with prompt length (families differ in length); "
                    "entropy_answer_norm: H / log(T) at the answer position.",
    "struct_mass": "attention mass from the answer position onto each structural region: bos (first token), "
                   "template (the other special tokens), system, question, options, prompt_other (the rest of "
                   "the user turn), rationale (gold assistant text through </think>), answer_cue (the rest, "
                   "e.g. '\\nAnswer:'). A token belongs to the region of its first non-space character.",
    "lex_mass": "attention mass from the answer position onto lexical classes: digit (a token with a digit), "
                "operator (+ - * / = ^ % < > and the like, not hyphens inside words), stoney_term (a letter word "
                "judged Stoney by the Stoney task's language judge: Stoney letters, vocabularies learned from "
                "the bundled conversations, a character-trigram fallback; Stoney prompts only), english (other "
                "letter words), other (spaces, punctuation, special tokens). A token takes the first class it "
                "touches in that order.",
    "token_share": "the share of context tokens in each region: the mass that uniform attention would give it.",
    "previous_token": "mean attention from each query i >= 1 onto token i - 1, over the task prompts.",
    "sink": "mean attention from each query i >= 1 onto the first token (<|bos|>), over the task prompts.",
    "induction": "on <|bos|> + R + R (R: random tokens), mean attention from each token of the second copy onto "
                 "the token that followed its earlier occurrence; interval over random sequences.",
    "option_lookup": "multiple choice only: attention mass from the answer position onto the tokens of the "
                     "correct option's line ('E) 32400').",
    "option_share": "option_lookup divided by the mass on all five option lines (about 0.2 when a head does not "
                    "prefer the correct one).",
    "logit_lens": "for each depth l (0 = embeddings, l = after block l), the residual stream at the answer "
                  "position read through the final norm and lm_head: log-prob of the answer token, top-1 rate "
                  "(rank 1), mean log10 rank, and for multiple choice the letter accuracy; the last depth is the "
                  "model's own output.",
    "ablation": "drop in the answer's log-prob (base minus ablated; positive = the head helps) when one head's "
                "output is set to zero (zero) or to its mean over every position of every analysed prompt of "
                "this checkpoint (mean), one head at a time.",
    "topk_ablation": "the same drop when the k heads with the largest mean single-head drop on a family's train "
                     "items are ablated together; 'own' = the family's heads, '<family>' = the other family's "
                     "heads, 'random' = the mean over random sets of k heads (a control).",
    "overlap": "agreement of the families' head maps: Jaccard index of their top-k heads and Spearman rank "
               "correlation of their mean single-head drops.",
    "interval": "95% percentile bootstrap over examples (1000 resamples, seeded); two numbers 'differ' in the "
                "summary when their intervals do not overlap (a conservative test).",
    "roles": "a head gets a role when its score is at least the threshold: " +
             ", ".join(f"{k} >= {v}" for k, v in ROLE_THRESHOLDS.items()) + ".",
    "role_thresholds": ROLE_THRESHOLDS,
}


# -----------------------------------------------------------------------------
# scores from attention patterns (pure functions; p is [..., Tq, Tk], rows sum to 1)

def pattern_entropy(p, dim=-1):
    """Entropy in nats of attention distributions along `dim` (0 log 0 = 0)."""
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim)


def previous_token_score(p):
    """[..., T, T] causal pattern -> [...]: mean over queries i >= 1 of p[i, i-1]."""
    return torch.diagonal(p, offset=-1, dim1=-2, dim2=-1).mean(-1)


def normalized_entropy(p):
    """[..., T, T] causal pattern -> [...]: mean over queries i >= 1 of H_i / log(i + 1), the
    entropy as a share of its maximum (uniform over the i + 1 visible keys), which removes the
    growth of entropy with prompt length."""
    T = p.size(-1)
    return (pattern_entropy(p[..., 1:, :]) / torch.log(torch.arange(2, T + 1, device=p.device, dtype=p.dtype))).mean(-1)


def sink_score(p):
    """[..., T, T] -> [...]: mean over queries i >= 1 of the mass on key 0."""
    return p[..., 1:, 0].mean(-1)


def induction_score(p, n_rep, start=1):
    """[..., T, T] on a sequence prefix(start) + R + R with len(R) = n_rep -> [...]: mean over the
    second copy's tokens of the mass on the token after the same token's first occurrence."""
    j = torch.arange(n_rep, device=p.device)
    return p[..., start + n_rep + j, start + 1 + j].mean(-1)


def region_mass(rows, labels, n_regions):
    """rows [..., T] attention, labels [T] region ids (-1 = none) -> [..., R] mass per region."""
    labels = torch.as_tensor(labels, device=rows.device)
    onehot = torch.nn.functional.one_hot(labels.clamp(min=0), n_regions).to(rows.dtype)
    onehot = onehot * (labels >= 0)[:, None].to(rows.dtype)
    return rows @ onehot


def classify_heads(scores, thresholds=None):
    """{role: [(layer, head), ...]} for every role score map [L, H] at or above its threshold."""
    thresholds = thresholds or ROLE_THRESHOLDS
    out = {}
    for role, s in scores.items():
        if role in thresholds and s is not None:
            s = np.asarray(s)
            out[role] = [(int(l), int(h)) for l, h in zip(*np.nonzero(s >= thresholds[role]))]
    return out


# -----------------------------------------------------------------------------
# items: an example turned into token ids, the answer position and per-token labels

@dataclass
class Item:
    task: str
    family: str
    split: str
    id: str
    ids: list                 # context tokens; the last one is the answer position
    target: int               # the answer's first token (scored at the answer position)
    struct: np.ndarray        # [T] index into STRUCT_REGIONS
    lexical: np.ndarray       # [T] index into LEXICAL_REGIONS
    option: np.ndarray = None  # [T] option index 0..4 of each token's option line, -1 elsewhere
    answer_index: int = None   # index of the correct option (MC)
    letter_ids: list = None    # the five candidate answer tokens (MC)
    tokens: list = field(default_factory=list)  # display strings

    @property
    def group(self):
        return "train" if self.split == "train" else "heldout"

    @property
    def pos(self):
        return len(self.ids) - 1


def token_offsets(tokenizer, text):
    """(ids, [(char_start, char_end)]) of `text` as tokenizer.encode tokenizes it."""
    hf = getattr(tokenizer, "hf", None)
    if hf is not None:
        enc = hf.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]
    ids, offsets, pos = tokenizer.encode(text), [], 0  # decode token by token
    for i in ids:
        piece = tokenizer.decode([i])
        start = text.find(piece, pos) if piece else pos
        start = pos if start < 0 else start
        offsets.append((start, start + len(piece)))
        pos = start + len(piece)
    return ids, offsets


def first_char_label(char_labels, offsets, text):
    """Per token: the label of its first non-space character (of its first character if blank)."""
    out = []
    for a, b in offsets:
        j = next((c for c in range(a, b) if not text[c].isspace()), a)
        out.append(char_labels[j] if j < len(char_labels) else -1)
    return out


def word_judge():
    """(judge(word) -> "s"|"e", description): the Stoney task's own language judge."""
    lang = Lang([c for convs in load_corpus()["convs"].values() for c in convs])
    return lang.word, "nanostoney.tasks.stoney.Lang over the bundled conversations"


def lexical_char_labels(text, family, judge):
    """Per character: index into LEXICAL_REGIONS before token-level priority is applied."""
    lab = np.full(len(text), LEXICAL_REGIONS.index("other"))
    if family == "stoney":
        for m in WORD_RE.finditer(text):
            cls = "stoney_term" if judge(m.group(0)) == "s" else "english"
            lab[m.start():m.end()] = LEXICAL_REGIONS.index(cls)
    else:
        for m in WORD_RE.finditer(text):
            lab[m.start():m.end()] = LEXICAL_REGIONS.index("english")
    for i, ch in enumerate(text):
        if ch.isdigit() or (ch in ".," and 0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit()):
            lab[i] = LEXICAL_REGIONS.index("digit")
        elif ch in OPERATOR_CHARS and not (ch == "-" and 0 < i < len(text) - 1 and text[i - 1].isalpha()
                                           and text[i + 1].isalpha()):
            lab[i] = LEXICAL_REGIONS.index("operator")
    return lab


def token_lexical(char_lab, offsets):
    """A token takes the highest-priority class among its characters (order of LEXICAL_REGIONS,
    except that digit and operator outrank words)."""
    priority = [LEXICAL_REGIONS.index(c) for c in ("digit", "operator", "stoney_term", "english", "other")]
    out = []
    for a, b in offsets:
        present = set(char_lab[a:b].tolist()) if b > a else {LEXICAL_REGIONS.index("other")}
        out.append(next(c for c in priority if c in present))
    return out


def user_text(prompt):
    """The first user turn as the tokenizer renders it (the system message folded in)."""
    msgs = [m for m in prompt]
    if msgs and msgs[0]["role"] == "system":
        return msgs[0]["content"] + SYSTEM_JOIN + msgs[1]["content"]
    return msgs[0]["content"]


def display_token(text):
    """A token's text for figure labels (newlines and tabs made visible)."""
    return text.replace("\n", "↵").replace("\t", "⇥")


def answer_cue(task, example):
    """Where the gold assistant text's last "Answer:" starts; a UserError when there is none."""
    cue = example["messages"][-1]["content"].rfind(MARKER)
    if cue < 0:
        raise UserError(f"task {task.name} has no 'Answer:' line in its gold answers, so it has no answer "
                        f"position; pick tasks with one (e.g. stoney_mc, stoney_lexicon, aqua_mc, gsm8k_mc).")
    return cue


def prepare_item(tokenizer, task, example, split, judge, rationale="gold"):
    """An Item for one example, or a UserError when the example has no answer line."""
    prompt = task.prompt(example)
    gold = example["messages"][-1]["content"]
    cue = answer_cue(task, example)
    start = cue + len(MARKER)
    while start < len(gold) and gold[start].isspace():
        start += 1
    if start >= len(gold):
        raise UserError(f"example {example['id']} of task {task.name} has an empty answer; fix the task data.")
    if rationale == "empty":
        head = "<think></think>\n" + gold[cue:start]
        gold, start = head + gold[start:], len(head)
    prompt_ids = tokenizer.render_prompt(prompt)
    text = user_text(prompt)
    u_ids, u_off = token_offsets(tokenizer, text)
    bos, us, ue, ast = (tokenizer.token_id(s) for s in ("<|bos|>", "<|user_start|>", "<|user_end|>",
                                                         "<|assistant_start|>"))
    if prompt_ids != [bos, us] + u_ids + [ue, ast]:
        raise UserError(f"task {task.name} renders prompts of more than one user turn; interp needs "
                        f"single-turn prompts.")
    a_ids, a_off = token_offsets(tokenizer, gold)
    k = next(j for j, (a, b) in enumerate(a_off) if b > start)  # first token touching the answer
    ids = prompt_ids + a_ids[:k]
    # structure labels
    R = {name: i for i, name in enumerate(STRUCT_REGIONS)}
    ch = np.full(len(text), R["prompt_other"])
    regions = example.get("regions", {})
    for name in ("system", "question", "options"):
        if name in regions:
            a, b = regions[name]
            ch[a:b] = R[name]
    think_end = gold.find("</think>")
    think_end = think_end + len("</think>") if think_end >= 0 else 0
    a_ch = np.where(np.arange(len(gold)) < think_end, R["rationale"], R["answer_cue"])
    struct = ([R["bos"], R["template"]] + first_char_label(ch, u_off, text) + [R["template"]] * 2
              + first_char_label(a_ch, a_off[:k], gold))
    # lexical labels
    other = LEXICAL_REGIONS.index("other")
    lex = ([other] * 2 + token_lexical(lexical_char_labels(text, task.family, judge), u_off) + [other] * 2
           + token_lexical(lexical_char_labels(gold, task.family, judge), a_off[:k]))
    item = Item(task=task.name, family=task.family, split=split, id=example["id"], ids=ids, target=a_ids[k],
                struct=np.array(struct), lexical=np.array(lex))
    if example.get("choices") and all(f"option_{c}" in regions for c in LETTERS):
        ch_opt = np.full(len(text), -1)
        for n, c in enumerate(LETTERS):
            a, b = regions[f"option_{c}"]
            ch_opt[a:b] = n
        item.option = np.array([-1, -1] + first_char_label(ch_opt, u_off, text) + [-1] * (2 + k))
        letters = []
        for c in LETTERS:  # the same gold with each letter: the candidate's token at position k
            c_ids = tokenizer.encode(gold[:start] + c)
            letters.append(c_ids[k] if len(c_ids) > k and c_ids[:k] == a_ids[:k] else None)
        answer = str(example.get("answer", "")).strip()
        if answer in LETTERS:
            item.answer_index = LETTERS.index(answer)
            if None not in letters and len(set(letters)) == 5:  # else the tokenizer splits letters unevenly
                item.letter_ids = letters
    # labels from the text each token covers, so a character split over byte tokens still reads well
    item.tokens = (["<|bos|>", "<|user_start|>"] + [display_token(text[a:b]) for a, b in u_off] +
                   ["<|user_end|>", "<|assistant_start|>"] + [display_token(gold[a:b]) for a, b in a_off[:k]])
    return item


def select_examples(task, n, seed=0, spare=3):
    """{split: [example]}: a seeded sample of up to n * spare examples per split, in a fixed
    random order (the same for every checkpoint). run_checkpoint keeps the first n that fit the
    model's context, so a few over-long prompts do not shrink the sample."""
    out = {}
    for split in ("train", "val", "test"):
        rows = list(task.examples(split))
        random.Random(f"{seed}:{task.name}:{split}").shuffle(rows)
        out[split] = rows[:n * spare]
    return out


# -----------------------------------------------------------------------------
# probes of our own

class ItemProbe(probes.Probe):
    """One forward of one prompt (batch 1): per layer, previous-token and sink scores, the answer
    row of every head's pattern, per-head output sums (for mean ablation) and, when asked, the
    full patterns (for figures). Patterns are formed one layer at a time and dropped."""

    def __init__(self, n_layer, pos, keep_full=False):
        self.pos, self.keep_full = pos, keep_full
        self.prev, self.sink, self.rows = [None] * n_layer, [None] * n_layer, [None] * n_layer
        self.full, self.out_sum, self.norm_ent = [None] * n_layer, [None] * n_layer, [None] * n_layer

    @torch.compiler.disable
    def on_attn(self, layer, q, k, v, y, mask):
        with torch.no_grad():
            p = probes.attention_pattern(q[:1], k[:1], mask)[0]  # [H, T, T]
            self.prev[layer] = previous_token_score(p).cpu()
            self.sink[layer] = sink_score(p).cpu()
            self.norm_ent[layer] = normalized_entropy(p).cpu()
            self.rows[layer] = p[:, self.pos].cpu()
            if self.keep_full:
                self.full[layer] = p.half().cpu()
            self.out_sum[layer] = y[0].float().sum(1).cpu()  # [H, head_dim]
        return y


class PatternProbe(probes.Probe):
    """Applies fn(pattern [B, H, T, T]) per layer and keeps the result (small scores only)."""

    def __init__(self, n_layer, fn):
        self.fn, self.out = fn, [None] * n_layer

    @torch.compiler.disable
    def on_attn(self, layer, q, k, v, y, mask):
        with torch.no_grad():
            self.out[layer] = self.fn(probes.attention_pattern(q, k, mask)).cpu()
        return y


class RowAblate(probes.Probe):
    """Ablation that differs per batch row: scale [B, L, H], use_mean [B] (1 = mean, 0 = zero
    ablation); head output y <- s*y + (1-s)*use_mean*mean, mean [L, H, head_dim]."""

    def __init__(self, scale, mean=None, use_mean=None):
        self.scale, self.mean, self.use_mean = scale, mean, use_mean

    @torch.compiler.disable
    def on_attn(self, layer, q, k, v, y, mask):
        s = self.scale[:, layer].to(y.device, y.dtype)[:, :, None, None]  # [B, H, 1, 1]
        y = y * s
        if self.mean is not None:
            w = (1 - s) * self.use_mean.to(y.device, y.dtype)[:, None, None, None]
            y = y + w * self.mean[layer].to(y.device, y.dtype)[None, :, None, :]
        return y


# -----------------------------------------------------------------------------
# measurements on a model

@torch.no_grad()
def analyse_item(model, item, keep_full=False):
    """Every per-example statistic of one item (numpy arrays), plus head-output sums."""
    gpt = unwrap(model)
    c = gpt.config
    device = gpt.get_device()
    x = torch.tensor([item.ids], device=device)
    probe = ItemProbe(c.n_layer, item.pos, keep_full)
    with probes.attention_entropy_probe(gpt, dtype=torch.float32) as ent, probes.attach(gpt, probe), \
            probes.residuals(gpt) as res:
        gpt(x)
    rows = torch.stack(probe.rows).float()  # [L, H, T]
    rec = {"entropy": ent.per_layer_head.cpu().numpy(),
           "entropy_answer": pattern_entropy(rows).numpy(),
           "entropy_norm": torch.stack(probe.norm_ent).numpy(),
           "entropy_answer_norm": (pattern_entropy(rows) / np.log(len(item.ids))).numpy(),
           "previous_token": torch.stack(probe.prev).numpy(),
           "sink": torch.stack(probe.sink).numpy(),
           "struct_mass": region_mass(rows, item.struct, len(STRUCT_REGIONS)).numpy(),
           "lex_mass": region_mass(rows, item.lexical, len(LEXICAL_REGIONS)).numpy(),
           "struct_share": np.bincount(item.struct, minlength=len(STRUCT_REGIONS)) / len(item.ids),
           "lex_share": np.bincount(item.lexical, minlength=len(LEXICAL_REGIONS)) / len(item.ids)}
    if item.answer_index is not None and item.option is not None:
        opt = torch.as_tensor(item.option)
        on_opt = region_mass(rows, opt, 5).numpy()  # [L, H, 5]
        rec["option_lookup"] = on_opt[..., item.answer_index]
        rec["option_share"] = on_opt[..., item.answer_index] / np.maximum(on_opt.sum(-1), 1e-9)
    # logit lens: every depth's residual at the answer position through the final norm + lm_head
    resid = torch.stack([r[0, item.pos] for r in res.resid])  # [L+1, C]
    logits = gpt.lm_logits(resid)
    logp = torch.log_softmax(logits, -1)
    tgt = logits[:, item.target]
    rec["lens_logprob"] = logp[:, item.target].cpu().numpy()
    rank = (logits > tgt[:, None]).sum(-1) + 1
    rec["lens_top1"] = (rank == 1).float().cpu().numpy()
    rec["lens_log10_rank"] = torch.log10(rank.float()).cpu().numpy()
    if item.letter_ids is not None:
        choice = logits[:, item.letter_ids].argmax(-1)
        rec["lens_choice"] = (choice == item.answer_index).float().cpu().numpy()
        rec["accuracy"] = float(rec["lens_choice"][-1])
    else:
        rec["accuracy"] = float(rec["lens_top1"][-1])
    rec["answer_logprob"] = float(rec["lens_logprob"][-1])
    out_sum = torch.stack(probe.out_sum)  # [L, H, D]
    full = torch.stack(probe.full).numpy() if keep_full else None
    return rec, out_sum, full


def blocks_from(gpt, x, layer):
    """Run blocks layer.. on the residual stream x [B, T, C] entering block `layer` (no cache):
    the rest of GPT.trunk, so ablations in layer l can reuse the clean stream before it."""
    cos_sin, mask = gpt._rotary_and_mask(x.size(0), x.size(1), None)
    for block in gpt.transformer.h[layer:]:
        x = block(x, cos_sin, None, mask)
    return x


@torch.no_grad()
def ablation_logprob_drops(model, ids, target, rows, mean=None, max_batch_tokens=16384):
    """Drop of log p(target) at the last position of `ids` for each ablation in `rows`, a list of
    (scale [L, H], use_mean) with scale 0 on the ablated heads. Blocks before a row's first
    ablated layer are not recomputed: every row starts from the clean residual stream there,
    batched with one clean row that gives the baseline under the same arithmetic."""
    gpt = unwrap(model)
    L = gpt.config.n_layer
    x = torch.tensor([ids], device=gpt.get_device())
    with probes.residuals(gpt) as res:
        gpt.trunk(x)
    first = [int((s < 1).any(1).nonzero()[0]) if bool((s < 1).any()) else L for s, _ in rows]
    drops = torch.zeros(len(rows))
    chunk = max(2, max_batch_tokens // len(ids))
    for layer in sorted(set(first) - {L}):
        idx = [i for i, f in enumerate(first) if f == layer]
        for part in [idx[j:j + chunk - 1] for j in range(0, len(idx), chunk - 1)]:
            scale = torch.stack([torch.ones(L, gpt.config.n_head)] + [rows[i][0] for i in part])
            use_mean = torch.tensor([0.0] + [float(rows[i][1]) for i in part])
            with probes.attach(gpt, RowAblate(scale, mean, use_mean)):
                h = blocks_from(gpt, res.resid[layer].expand(len(part) + 1, -1, -1), layer)[:, -1]
            lp = torch.log_softmax(gpt.lm_logits(h), -1)[:, target].cpu()
            drops[part] = lp[0] - lp[1:]
    return drops


def head_set_scale(n_layer, n_head, heads):
    s = torch.ones(n_layer, n_head)
    for layer, head in heads:
        s[layer, head] = 0
    return s


def single_head_rows(n_layer, n_head, use_mean):
    return [(head_set_scale(n_layer, n_head, [(l, h)]), use_mean) for l in range(n_layer) for h in range(n_head)]


def ablation_drops(model, item, mean=None):
    """[L, H] drop of the answer's log-prob when each head alone is ablated (zero if mean is None)."""
    c = unwrap(model).config
    rows = single_head_rows(c.n_layer, c.n_head, mean is not None)
    return ablation_logprob_drops(model, item.ids, item.target, rows, mean).view(c.n_layer, c.n_head).numpy()


@torch.no_grad()
def pattern_scores(model, x):
    """{"previous_token", "sink"}: [B, L, H] scores of each row of the token batch x [B, T]."""
    gpt = unwrap(model)
    probe = PatternProbe(gpt.config.n_layer, lambda p: torch.stack([previous_token_score(p), sink_score(p)]))
    with probes.attach(gpt, probe):
        gpt(torch.as_tensor(x, device=gpt.get_device()))
    s = torch.stack(probe.out, 2).numpy()  # [2, B, L, H]
    return {"previous_token": s[0], "sink": s[1]}


@torch.no_grad()
def induction_scores(model, vocab_size, n_seqs=16, n_rep=32, seed=0, bos_id=None):
    """Per random sequence [N, L, H] induction and previous-token scores on <|bos|> + R + R."""
    gpt = unwrap(model)
    c = gpt.config
    n_rep = max(2, min(n_rep, (c.sequence_len - 1) // 2))
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(0, vocab_size, (n_seqs, n_rep), generator=g)
    bos = torch.full((n_seqs, 1), bos_id if bos_id is not None else 0)
    x = torch.cat([bos, r, r], 1).to(gpt.get_device())
    probe = PatternProbe(c.n_layer, lambda p: torch.stack([induction_score(p, n_rep), previous_token_score(p)]))
    with probes.attach(gpt, probe):
        gpt(x)
    s = torch.stack(probe.out, 2).numpy()  # [2, N, L, H]
    return {"induction": s[0], "previous_token_random": s[1], "n_rep": n_rep}


# -----------------------------------------------------------------------------
# intervals over examples

def interval(values, n_boot=1000, seed=0):
    """{"mean", "lo", "hi", "n"} for values [N, ...]: the mean over examples and its bootstrap
    95% interval per entry (metrics.bootstrap_means: NaN entries left out), rounded for the
    report; None when there are no examples."""
    v = np.asarray(values, dtype=np.float64)
    if v.shape[0] == 0:
        return None
    point, lo, hi = bootstrap_means(v, n_boot, seed)
    r = (lambda a: np.round(a, 6).tolist()) if v.ndim > 1 else (lambda a: round(float(a), 6))
    return {"mean": r(point), "lo": r(lo), "hi": r(hi), "n": int(v.shape[0])}


# -----------------------------------------------------------------------------
# one checkpoint, every statistic

SCALAR_KEYS = ("answer_logprob", "accuracy")
ARRAY_KEYS = ("entropy", "entropy_answer", "entropy_norm", "entropy_answer_norm", "previous_token", "sink",
              "struct_mass", "lex_mass", "struct_share",
              "lex_share", "option_lookup", "option_share", "lens_logprob", "lens_top1", "lens_log10_rank",
              "lens_choice", "ablate_zero", "ablate_mean")


def derived(recs, key):
    """Per-example arrays for a statistic name, including reductions used by the figures."""
    base, _, red = key.partition(":")
    vals = [r.get(base) for r in recs]
    if all(v is None for v in vals):
        return None
    shape = np.shape(next(v for v in vals if v is not None))
    arr = np.stack([np.full(shape, np.nan) if v is None else np.asarray(v, dtype=np.float64) for v in vals])
    if red == "layer":      # mean over heads: [N, L] (or [N, L, R])
        arr = arr.mean(2)
    elif red == "all":      # mean over layers and heads: [N] (or [N, R])
        arr = arr.mean((1, 2))
    return arr


SUMMARY_KEYS = (list(SCALAR_KEYS) + list(ARRAY_KEYS) +
                ["entropy:layer", "entropy:all", "entropy_answer:layer", "entropy_answer:all", "entropy_norm:layer",
                 "entropy_norm:all", "entropy_answer_norm:layer", "entropy_answer_norm:all",
                 "previous_token:all", "sink:all", "option_lookup:all", "option_share:all",
                 "struct_mass:all", "lex_mass:all", "struct_mass:layer", "ablate_zero:all", "ablate_mean:all"])


def summarize(recs, n_boot=1000, seed=0):
    out = {"n": len(recs)}
    for key in SUMMARY_KEYS:
        arr = derived(recs, key)
        if arr is not None:
            out[key] = interval(arr, n_boot, seed)
    for mode in ABLATION_MODES:
        for name in sorted({k for r in recs for k in r.get(f"topk_{mode}", {})}):
            arr = np.array([r.get(f"topk_{mode}", {}).get(name, np.nan) for r in recs], dtype=np.float64)
            out[f"topk_{mode}:{name}"] = interval(arr, n_boot, seed)
    return out


def spearman(a, b):
    ra = np.argsort(np.argsort(np.ravel(a))).astype(float)
    rb = np.argsort(np.argsort(np.ravel(b))).astype(float)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def top_heads(drops, k):
    """The k heads with the largest mean drop, [(layer, head)], largest first."""
    m = np.asarray(drops)
    order = np.argsort(-m.ravel(), kind="stable")[:k]
    return [(int(i // m.shape[1]), int(i % m.shape[1])) for i in order]


def build_items(tokenizer, examples, limit, max_len, vocab_size, judge, rationale):
    """(items, {task: examples skipped as too long}): of each split's list the first `limit`
    examples whose context fits in max_len tokens (and the model's vocabulary)."""
    items, skipped = [], {}
    for name, (task, by_split) in examples.items():
        for split, rows in by_split.items():
            kept = 0
            for ex in rows:
                if limit is not None and kept >= limit:
                    break
                it = prepare_item(tokenizer, task, ex, split, judge, rationale)
                if len(it.ids) > max_len or max(it.ids + [it.target]) >= vocab_size:
                    skipped[name] = skipped.get(name, 0) + 1
                    continue
                items.append(it)
                kept += 1
    if not items:
        raise UserError(f"every selected example is longer than {max_len} tokens; raise --max-len.")
    return items, skipped


def analyse_items(gpt, items, families, figure_examples, progress, info=None):
    """Pass 1, one forward per item: (per-example records, every head's mean output over all
    analysed positions [L, H, head_dim], full patterns of the figure items). The figure items
    are the first held-out items of each family (its first task first). Under torchrun the
    items are shared out over the ranks and every rank gets all results (summed in item order:
    the same numbers at any world size)."""
    figure_ids = set()
    for fam in families:
        held = [it for it in items if it.family == fam and it.group == "heldout"] or \
            [it for it in items if it.family == fam]
        figure_ids |= {it.id for it in held[:figure_examples]}

    def analyse(it):
        rec, s, full = analyse_item(gpt, it, keep_full=it.id in figure_ids)
        rec.update(task=it.task, family=it.family, split=it.split, group=it.group, id=it.id)
        return rec, s, full

    done = map_over_ranks(analyse, items, info, wrap=_bar("analyse", progress, info))
    recs, figures = [rec for rec, _, _ in done], {}
    out_sum = torch.stack([s for _, s, _ in done]).sum(0)
    for it, (_, _, full) in zip(items, done):
        if full is not None:
            figures[it.id] = {"task": it.task, "family": it.family, "split": it.split, "tokens": it.tokens,
                              "struct": it.struct.tolist(), "full": full}
    return recs, out_sum / sum(len(it.ids) for it in items), figures


def _rank(info):
    return info.rank if info is not None else get_rank()


def _bar(desc, progress, info):
    """A progress bar around this rank's share of the items (rank 0 only)."""
    return lambda idx: tqdm(idx, desc=desc, disable=not progress or _rank(info) != 0, leave=False)


def ablate_heads(gpt, items, recs, means, families, top_k, n_random_sets, seed, progress, info=None):
    """Pass 2, single-head ablations (both modes, into each record), then the top-k heads of
    each family (chosen on its train items, or all its items if none), the other family's and
    random k-head sets ablated together. Returns (k, {mode: {family: heads}}, random sets).
    Items are shared out over the ranks as in analyse_items."""
    L, H = gpt.config.n_layer, gpt.config.n_head
    single = single_head_rows(L, H, False) + single_head_rows(L, H, True)

    def drops_of(rows):
        return lambda it: ablation_logprob_drops(gpt, it.ids, it.target, rows, means).numpy()

    drops = map_over_ranks(drops_of(single), items, info, wrap=_bar("ablate heads", progress, info))
    for rec, d in zip(recs, drops):
        rec["ablate_zero"], rec["ablate_mean"] = d.reshape(2, L, H)
    k = max(1, min(top_k, L * H - 1))
    topk, rng = {}, np.random.default_rng(seed)
    random_sets = [[(int(i // H), int(i % H)) for i in rng.choice(L * H, k, replace=False)]
                   for _ in range(n_random_sets)]
    for mode in ABLATION_MODES:
        topk[mode] = {}
        for fam in families:
            fr = [r for r in recs if r["family"] == fam]
            chosen = [r for r in fr if r["group"] == "train"] or fr
            topk[mode][fam] = top_heads(np.mean([r[f"ablate_{mode}"] for r in chosen], 0), k)
    sets = {mode: [topk[mode][f] for f in families] + random_sets for mode in ABLATION_MODES}
    rows = [(head_set_scale(L, H, hs), mode == "mean") for mode in ABLATION_MODES for hs in sets[mode]]
    drops = map_over_ranks(drops_of(rows), items, info, wrap=_bar("ablate top-k", progress, info))
    for it, rec, drop in zip(items, recs, drops):
        for m, mode in enumerate(ABLATION_MODES):
            dm = drop[m * len(sets[mode]):(m + 1) * len(sets[mode])]
            d = {("own" if f == it.family else f): float(dm[i]) for i, f in enumerate(families)}
            d["random"] = float(dm[len(families):].mean()) if n_random_sets else float("nan")
            rec[f"topk_{mode}"] = d
    return k, topk, random_sets


def group_summaries(recs, families, task_names, n_boot, seed):
    """{"n_items", "families": {family or all: {group or all: summary}}, "tasks": {task: {group: scalars}}}."""
    out = {"n_items": {}, "families": {}, "tasks": {}}
    for fam in families + ["all"]:
        out["families"][fam] = {}
        for grp in SPLIT_GROUPS + ("all",):
            sel = [r for r in recs if fam in (r["family"], "all") and grp in (r["group"], "all")]
            if sel:
                out["families"][fam][grp] = summarize(sel, n_boot, seed)
    for name in task_names:
        out["tasks"][name] = {}
        for grp in SPLIT_GROUPS:
            sel = [r for r in recs if r["task"] == name and r["group"] == grp]
            out["n_items"][f"{name}/{grp}"] = len(sel)
            if sel:
                s = {"n": len(sel)}
                for key in ("answer_logprob", "accuracy", "entropy:all", "sink:all", "option_lookup:all"):
                    arr = derived(sel, key)
                    if arr is not None:
                        s[key] = interval(arr, n_boot, seed)
                out["tasks"][name][grp] = s
    return out


def head_roles(out, k, topk, random_sets, families):
    """{"roles", "topk", "overlap"}: head roles from the all-items scores, the top-k heads and
    how much the first two families' heads overlap."""
    every = out["families"]["all"]["all"]
    scores = {"previous_token": every["previous_token"]["mean"], "sink": every["sink"]["mean"],
              "induction": out["induction"]["induction"]["mean"],
              "option_lookup": every["option_lookup"]["mean"] if "option_lookup" in every else None}
    overlap = {}
    if len(families) >= 2:
        a, b = families[:2]
        for mode in ABLATION_MODES:
            sa, sb = set(topk[mode][a]), set(topk[mode][b])
            ma = out["families"][a]["all"][f"ablate_{mode}"]["mean"]
            mb = out["families"][b]["all"][f"ablate_{mode}"]["mean"]
            overlap[mode] = {"families": [a, b], "jaccard": len(sa & sb) / len(sa | sb),
                             "shared": sorted([list(h) for h in sa & sb]), "spearman": spearman(ma, mb)}
    return {"roles": {r: [list(h) for h in hs] for r, hs in classify_heads(scores).items()},
            "topk": {"k": k, "heads": {m: {f: [list(h) for h in hs] for f, hs in v.items()} for m, v in topk.items()},
                     "random_sets": [[list(h) for h in s] for s in random_sets],
                     "chosen_on": "each family's train items (all its items when it has none)"},
            "overlap": overlap}


def example_figures(figures, topk):
    """Example attention figures: the answer row of every head and the full pattern of the
    family's most important head (largest mean zero-ablation drop)."""
    out = []
    for eid, f in figures.items():
        lh = topk["zero"][f["family"]][0]
        full = f.pop("full")
        f.update(answer_rows=np.round(full[:, :, -1].astype(np.float32), 4).tolist(), head=list(lh),
                 pattern=np.round(full[lh[0], lh[1]].astype(np.float32), 4).tolist())
        out.append({"id": eid, **f})
    return out


def run_checkpoint(model, tokenizer, examples, *, limit=None, top_k=5, n_random_sets=3, n_induction=16,
                   induction_len=32, seed=0, n_boot=1000, max_len=None, figure_examples=1, rationale="gold", judge=None,
                   progress=True, info=None):
    """Every statistic for one model. examples: {task: (Task, {split: [example]})}; of each
    list the first `limit` examples whose context fits in max_len tokens are analysed.

    Returns a JSON-able dict: per family and split group the bootstrap summaries, per task the
    scalars, head roles, top-k heads and their overlap, and data for example attention figures.
    Under torchrun (info: a DistInfo) the per-item passes are shared out over the ranks; rank 0
    computes the summaries and the other ranks return None.
    """
    gpt = unwrap(model).eval()
    c = gpt.config
    items, skipped = build_items(tokenizer, examples, limit, max_len or c.sequence_len, c.vocab_size,
                                 judge or word_judge()[0], rationale)
    families = sorted({it.family for it in items}, key=lambda f: (f != "stoney", f))
    recs, means, figures = analyse_items(gpt, items, families, figure_examples, progress, info)
    k, topk, random_sets = ablate_heads(gpt, items, recs, means, families, top_k, n_random_sets, seed, progress, info)
    if _rank(info) != 0:
        return None
    out = {"model": {"n_layer": c.n_layer, "n_head": c.n_head, "n_kv_head": c.n_kv_head, "n_embd": c.n_embd,
                     "vocab_size": c.vocab_size, "sequence_len": c.sequence_len}}
    groups = group_summaries(recs, families, list(examples), n_boot, seed)
    out.update(n_items=groups["n_items"], skipped_too_long=skipped, families=groups["families"], tasks=groups["tasks"])
    # induction on random sequences
    vocab = min(c.vocab_size, tokenizer.vocab_size - len(getattr(tokenizer, "special_tokens", [])))
    ind = induction_scores(gpt, vocab, n_induction, induction_len, seed, tokenizer.bos_id)
    out["induction"] = {"n_rep": ind["n_rep"], "induction": interval(ind["induction"], n_boot, seed),
                        "previous_token_random": interval(ind["previous_token_random"], n_boot, seed)}
    out.update(head_roles(out, k, topk, random_sets, families))
    out["examples"] = example_figures(figures, topk)
    out["per_example"] = [{"id": r["id"], "task": r["task"], "split": r["split"],
                           "answer_logprob": round(r["answer_logprob"], 5), "accuracy": r["accuracy"]}
                          for r in recs]
    out["_recs"] = recs  # raw per-example arrays for paired comparisons (dropped before writing)
    return out


# -----------------------------------------------------------------------------
# comparisons: families, checkpoints, and paired deltas

COMPARE = (("answer_logprob", "answer log-prob"), ("accuracy", "accuracy"),
           ("entropy:all", "mean attention entropy (nats)"), ("entropy_answer:all", "entropy at the answer (nats)"),
           ("entropy_norm:all", "normalised attention entropy"),
           ("entropy_answer_norm:all", "normalised entropy at the answer"),
           ("sink:all", "sink score"), ("previous_token:all", "previous-token score"),
           ("option_lookup:all", "option lookup"), ("option_share:all", "option share"),
           ("ablate_zero:all", "mean single-head zero-ablation drop"),
           ("topk_zero:own", "top-k zero-ablation drop"), ("topk_mean:own", "top-k mean-ablation drop"))


def separated(a, b):
    """True when two {"mean","lo","hi"} scalar intervals do not overlap."""
    return a is not None and b is not None and (a["lo"] > b["hi"] or b["lo"] > a["hi"])


def fmt(s):
    return f"{s['mean']:.3g} [{s['lo']:.3g}, {s['hi']:.3g}]"


def scalar_items(fam_summary):
    """(key, label, {"mean","lo","hi"}) of every scalar statistic a summary can be compared on."""
    for key, label in COMPARE:
        s = fam_summary.get(key)
        if s is not None and not isinstance(s["mean"], list):
            yield key, label, s
    s = fam_summary.get("struct_mass:all")
    if s is not None:
        for i, region in enumerate(STRUCT_REGIONS):
            yield f"struct_mass:{region}", f"attention mass on {region}", \
                {"mean": s["mean"][i], "lo": s["lo"][i], "hi": s["hi"][i]}


def relative_size(s, o):
    return abs(s["mean"] - o["mean"]) / (abs(o["mean"]) + abs(s["mean"]) + 1e-9)


def scalar_differences(ck, grp, a, b, sa, sb):
    """Scalar statistics whose intervals separate family a from family b."""
    out, right = [], {k: s for k, _, s in scalar_items(sb)}
    for key, label, s in scalar_items(sa):
        if separated(s, right.get(key)):
            o = right[key]
            claim = f"{label} is {'higher' if s['mean'] > o['mean'] else 'lower'} for {a} than for {b}"
            values = f"{a} {fmt(s)} vs {b} {fmt(o)}"
            out.append({"kind": "family", "checkpoint": ck, "group": grp, "stat": key, "label": label,
                        "a": a, "b": b, "a_value": s, "b_value": o, "claim": claim, "values": values,
                        "size": relative_size(s, o), "text": f"{ck}, {grp}: {claim} ({values})."})
    return out


def layer_differences(ck, grp, a, sa, sb):
    """Layers whose (normalised) attention entropy separates family a from the other."""
    out = []
    for key, what, size in (("entropy_norm:layer", "normalised attention entropy", 0.6),
                            ("entropy:layer", "attention entropy (nats; grows with length)", 0.3)):
        la, lb = sa.get(key), sb.get(key)
        if not la or not lb:
            continue
        hi = [i for i in range(len(la["mean"])) if la["lo"][i] > lb["hi"][i]]
        lo = [i for i in range(len(la["mean"])) if lb["lo"][i] > la["hi"][i]]
        if hi or lo:
            parts = ([f"higher for {a} in layers {hi}"] if hi else []) + \
                ([f"lower for {a} in layers {lo}"] if lo else [])
            claim = f"{what} is " + " and ".join(parts)
            out.append({"kind": "family", "checkpoint": ck, "group": grp, "stat": key, "layers_higher": hi,
                        "layers_lower": lo, "size": size, "claim": claim, "values": "",
                        "text": f"{ck}, {grp}: {claim}."})
    return out


def head_differences(ck, grp, a, b, sa, sb):
    """How many heads' zero-ablation drops separate the two families."""
    za, zb = sa.get("ablate_zero"), sb.get("ablate_zero")
    if not za or not zb:
        return []
    a_lo, a_hi, b_lo, b_hi = (np.array(z[x]) for z in (za, zb) for x in ("lo", "hi"))
    n_sep = int(((a_lo > b_hi) | (b_lo > a_hi)).sum())
    if not n_sep:
        return []
    claim = (f"{n_sep} of {a_lo.size} heads matter differently to {a} and {b} when zeroed "
             f"(non-overlapping drop intervals)")
    return [{"kind": "family", "checkpoint": ck, "group": grp, "stat": "ablate_zero:heads", "n_heads": n_sep,
             "size": 0.4, "claim": claim, "values": "", "text": f"{ck}, {grp}: {claim}."}]


def checkpoint_differences(results, families):
    """Scalar statistics that moved between consecutive checkpoints, per family and split group."""
    out, names = [], list(results)
    for prev, cur in zip(names, names[1:]):
        for fam in families:
            for grp in SPLIT_GROUPS:
                sp = results[prev]["families"].get(fam, {}).get(grp)
                sc = results[cur]["families"].get(fam, {}).get(grp)
                if not sp or not sc:
                    continue
                right = {k: s for k, _, s in scalar_items(sp)}
                for key, label, s in scalar_items(sc):
                    o = right.get(key)
                    if separated(s, o):
                        out.append({"kind": "checkpoint", "a": cur, "b": prev, "family": fam, "group": grp,
                                    "stat": key, "label": label, "a_value": s, "b_value": o,
                                    "size": relative_size(s, o),
                                    "text": f"{fam}, {grp}: {label} went {'up' if s['mean'] > o['mean'] else 'down'}"
                                            f" from {prev} ({fmt(o)}) to {cur} ({fmt(s)})."})
    return out


def differences(results, families):
    """Structured list of non-overlapping intervals: between families within a checkpoint and
    split group (scalars, layers, heads), then between consecutive checkpoints within a family
    and split group."""
    diffs = []
    if len(families) >= 2:
        a, b = families[:2]
        for ck in results:
            fams = results[ck]["families"]
            for grp in SPLIT_GROUPS:
                sa, sb = fams.get(a, {}).get(grp), fams.get(b, {}).get(grp)
                if sa and sb:
                    diffs += (scalar_differences(ck, grp, a, b, sa, sb) + layer_differences(ck, grp, a, sa, sb)
                              + head_differences(ck, grp, a, b, sa, sb))
    return diffs + checkpoint_differences(results, families)


def paired_delta(results, new, old, n_boot=1000, seed=0):
    """How `new` moved each statistic relative to `old`, paired by example id: per family and
    split group, the bootstrap mean of (new - old) per example. Array statistics are compared
    only when their shapes agree (same architecture)."""
    rn = {r["id"]: r for r in results[new]["_recs"]}
    ro = {r["id"]: r for r in results[old]["_recs"]}
    ids = [i for i in rn if i in ro]
    keys = ["answer_logprob", "accuracy", "entropy:layer", "entropy_answer:layer", "entropy_norm:layer",
            "lens_logprob", "lens_top1",
            "struct_mass:all", "lex_mass:all", "previous_token", "sink", "option_lookup", "ablate_zero",
            "ablate_mean", "entropy:all", "sink:all", "option_lookup:all"]
    out = {"new": new, "old": old, "n_paired": len(ids), "families": {}}
    fams = sorted({rn[i]["family"] for i in ids}, key=lambda f: (f != "stoney", f))
    for fam in fams + ["all"]:
        out["families"][fam] = {}
        for grp in SPLIT_GROUPS + ("all",):
            sel = [i for i in ids if fam in (rn[i]["family"], "all") and grp in (rn[i]["group"], "all")]
            if not sel:
                continue
            d = {"n": len(sel)}
            for key in keys:
                a, b = derived([rn[i] for i in sel], key), derived([ro[i] for i in sel], key)
                if a is not None and b is not None and a.shape == b.shape:
                    d[key] = interval(a - b, n_boot, seed)
            out["families"][fam][grp] = d
    return out

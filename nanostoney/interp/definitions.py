"""The report's vocabulary: the regions, groups, contexts and modes every interp module names, the
thresholds of the declared tests, and the definitions the report prints beside its numbers."""

STRUCT_REGIONS = ("bos", "template", "system", "question", "options", "prompt_other", "rationale", "answer_cue")
LEXICAL_REGIONS = ("stoney_term", "english", "digit", "operator", "other")
SPLIT_GROUPS = ("train", "heldout")
OUTCOME_GROUPS = ("heldout_right", "heldout_wrong")  # held-out items the model's own greedy answer gets right/wrong
RATIONALE_CONTEXTS = ("own", "gold")  # the slot after a rationale, at "Answer:" (context_text)
CONTEXTS = RATIONALE_CONTEXTS + ("cloze",)
ABLATION_MODES = ("zero", "mean")
HEADLINE_MODE = "mean"  # the ablation the headline tests use (zero ablation stays exploratory)
ROLE_THRESHOLDS = {"previous_token": 0.5, "induction": 0.3, "sink": 0.5, "option_lookup": 0.3}
DIRECTIONS = {"s2e": "term → gloss", "e2s": "gloss → term"}
ALPHA = 0.05  # family-wise error rate of the headline tests
MIN_N = 10  # items a side for a headline test: 10 sign flips reach p = 2 / 2**10 at best

DEFINITIONS = {
    "context": "what precedes the answer slot: the prompt, then a rationale cut before its first sentence that "
               "states the answer, then '</think>\\nAnswer:'. own = the model's own greedy completion (default); "
               "gold = the gold rationale (teacher forcing). A sentence states the answer when it names an option "
               "letter ('option E', '(E)', 'E)', 'the answer is', 'Answer:') or mentions the gold answer or the "
               "model's own answer (an option's text, or its number when the option is one number). cloze = the "
               "question without its options, then the beginning every option's answer shares (no rationale).",
    "answer_position": "the answer slot: the position after the context where the answer's first token (the "
                       "letter for multiple choice; for cloze the gold answer's token where the options' answers "
                       "part) is predicted; statistics are read there.",
    "right_wrong": "held-out items split by the model's own greedy completion of the prompt: right when "
                   "task.evaluate accepts it (heldout_right), else heldout_wrong; for cloze, right when the "
                   "model's cloze pick is the gold option.",
    "answer_logprob": "log-probability (nats) of the gold answer's first token at the answer slot.",
    "accuracy": "multiple choice: the correct letter (cloze: the gold answer's token) has the highest logit among "
                "the five options' tokens at the slot; "
                "open answers (and MC when the tokenizer does not give the five letters as single tokens in that "
                "place): the gold first token is the model's top-1 token.",
    "entropy": "attention entropy in nats, -sum_j p_j log p_j, averaged over every query position of the context "
               "(position 0, which sees only itself, counts as 0); exact (probes.attention_entropy_probe).",
    "entropy_answer": "attention entropy (nats) of the answer slot's query; log(T) would be uniform over the "
                      "T context tokens.",
    "entropy_norm": "entropy as a share of its maximum, H_i / log(i + 1), averaged over query positions i >= 1: "
                    "free of the growth of entropy with prompt length (families differ in length); "
                    "entropy_answer_norm: H / log(T) at the answer slot.",
    "struct_mass": "attention mass from the answer slot onto each structural region: bos (first token), "
                   "template (the other special tokens), system, question, options, prompt_other (the rest of "
                   "the user turn), rationale (assistant text through </think>), answer_cue (the rest, "
                   "e.g. '\\nAnswer:'). A token belongs to the region of its first non-space character.",
    "lex_mass": "attention mass from the answer slot onto lexical classes: digit (a token with a digit), "
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
    "option_lookup": "multiple choice only: attention mass from the answer slot onto the tokens of the "
                     "correct option's line ('- 32400 E').",
    "option_share": "option_lookup divided by the mass on all five option lines (about 0.2 when a head does not "
                    "prefer the correct one).",
    "logit_lens": "for each depth l (0 = embeddings, l = after block l), the residual stream at the answer "
                  "slot read through the final norm and lm_head: log-prob of the answer token, top-1 rate "
                  "(rank 1), mean log10 rank, and for multiple choice the letter accuracy; the last depth is the "
                  "model's own output. decodable (one rule for every family, interp.attention.decodable): the answer "
                  "token is top-1 of the whole vocabulary at that depth.",
    "lens_first": "the first block depth (l >= 1, after block l) from which the answer stays decodable "
                  "through the output; undefined for an item whose answer is not decodable at the output. Depth 0 "
                  "(the embeddings) is left out: it decodes frequent answer words without reading the question; "
                  "lens_embedding reports that rate as a baseline.",
    "ablation": "drop in the answer's log-prob (base minus ablated; positive = the head helps) when one head's "
                "output is set to zero (zero) or to its mean over every position of every analysed prompt of "
                "this checkpoint (mean), one head at a time.",
    "subsets": "items are hash-split (by task and id) into a selection subset (every train item and about half "
               "of the held-out items) and a score subset (the other held-out items): heads are chosen on the "
               "first, their ablation effect is scored on the second.",
    "topk_ablation": "the same drop when k heads are ablated together: 'own' = the family's top-k heads (largest "
                     "mean single-head drop on the family's selection items), '<family>' = the other family's "
                     "heads, 'random' = the mean over random sets of k heads (a control).",
    "overlap": "agreement of the families' head maps: Jaccard index of their top-k heads and Spearman rank "
               "correlation of their mean single-head drops.",
    "interval": "exploratory tables and figures: 95% percentile bootstrap over examples (seeded), not corrected "
                "for multiple comparisons.",
    "headline": "the declared headline tests (HEADLINES), on held-out items: two-sided permutation p-values "
                "(sign flips for paired differences, label shuffles for two samples), Holm-Bonferroni adjusted "
                "across every headline test of the report (family-wise error 0.05); intervals are percentile "
                "bootstrap intervals at the Bonferroni level 1 - 0.05/m for m tests (simultaneous 95%). A result "
                "is significant when its Holm p is below 0.05 and its interval excludes 0. A test enters only with "
                "at least 10 items a side (decided before looking at the outcome).",
    "minimal_pair": "one held-out item read twice with the model's own assistant text held fixed: clean, and with "
                    "one thing in the question changed (math: an operand the model's chain copies from the question, "
                    "read where the chain writes it; Stoney: the term, from another item of the same task and "
                    "direction, read at the answer after the model's own rationale); the two prompts have the "
                    "same length and differ in at most 4 tokens (nanostoney.interp.pairs).",
    "patching": "activation patching: one activation of the clean run copied into the corrupted run (the residual "
                "stream entering each block at the changed token and at the slot, and each head's output at the "
                "slot); restored = LD(patched) - LD(corrupt), LD = logit of the clean answer's token minus the "
                "corrupted answer's at the slot, in nats; 'of the gap' = mean restored / mean (LD(clean) - "
                "LD(corrupt)). A site passes when its sign-flip p, Holm-corrected over every site of both "
                "families, is below 0.05 and its Bonferroni-level interval lies above 0 (nanostoney.interp.patching).",
    "roles": "a head gets a role when its score is at least the threshold: " +
             ", ".join(f"{k} >= {v}" for k, v in ROLE_THRESHOLDS.items()) + ".",
    "role_thresholds": ROLE_THRESHOLDS,
}

# the declared headline tests (stats.headlines), as the report defines them
HEADLINES = {
    "topk_vs_random": "which heads carry the answer: the drop in the answer's log-prob when the family's top-k "
                      "heads (chosen on its selection subset) are mean-ablated together, minus the drop for "
                      "random k heads; paired per held-out score item",
    "topk_vs_other": "whether the families use different heads: the same drop for the family's own top-k heads "
                     "minus the other family's top-k heads; paired per held-out score item",
    "lens_first": "where the answer is decided: the first depth from which the logit lens decodes the answer, "
                  "first family minus second, over held-out items it decodes at the output",
    "entropy_answer": "how focused the answer slot's attention is, per layer: normalised entropy H / log T "
                      "(mean over heads), first family minus second, held-out items",
    "delta": "for each NEW:OLD checkpoint pair, the paired change per held-out item (by task and id) of "
             "topk_vs_random, lens_first and entropy_answer, per family",
}

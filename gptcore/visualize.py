"""gptcore.visualize: pictures of the model's own forward pass and of its training run, in one report page.

WHAT'S GOING ON HERE
====================

WHAT
  `gptcore visualize --model DIR --prompt TEXT --out FOLDER` runs the prompt through the model once and
  draws what that forward computed, with matplotlib (the Agg backend: no window, no display needed):

    attention    for each block, every head's attention matrix over the prompt's tokens (rows: the
                 position that looks, t; columns: the positions it looks at, s <= t; grey above the
                 diagonal, where causal attention cannot look), and for each block which earlier tokens
                 the last position attends to, head by head: that row decides the next token.
    embeddings   the token embedding table wte (V, C) projected onto its two principal axes (PCA by
                 numpy's SVD), each point labelled with its token; the position embeddings wpe as an
                 image, and the cosine similarity of every pair of positions.
    the forward  the stages python/follow_the_data_flow.py prints (tokens, embeddings, each block,
                 the final LayerNorm, logits, the next token's probabilities) as tables and bars, and
                 the model's guess for the next token at every position of the prompt.
    the run      when DIR is (or sits in) a training run: the loss curves (train and validation, linear
                 or log y, a dashed line where a run resumed, its data and model in the title), the
                 learning rate, tokens/s, the statistics gptcore.dynamics recorded at each evaluation
                 (block output RMS, attention entropy, gradient RMS and update/weight ratio of
                 each weight matrix) and the samples printed at the end of training.

  Every picture is a PNG in FOLDER, every array a picture shows is an .npy file next to it (the
  attention of block i is attention_layer{i}.npy, (NH, T, T)), and report.html holds them all: the
  images embedded as data: URIs, the styles inline, no script, no network, so it opens from disk in
  any browser. `gptcore train` writes RUN/report.html at every evaluation (the run's pictures) and at
  the end (the run's and the model's, on the start of the validation text): write_run_report.

HOW (the pictures are the model's)
  Nothing here computes attention or activations again: the attention maps are
  model.attention_weights(layer), the block outputs model.activations, the probabilities the softmax of
  the logits model.forward returned, all from one forward of the prompt (tests/test_visualize.py
  recomputes a head's attention from the cached qkv by hand and compares).

WHERE
  gptcore.cli (visualize) and gptcore.train (report.html); the metrics come from RUN/metrics.jsonl
  (gptcore.train.Report), the samples from RUN/samples.jsonl.
"""
import base64
import html
import io
import math
import os
import warnings
from dataclasses import dataclass, field

import numpy as np

from gptcore import checkpoint
from gptcore.errors import GptcoreError
from gptcore.files import atomic_write, read_json_lines

REPORT = "report.html"
METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"
TRAIN_REPORT_TOKENS = 32        # the tokens of validation text the end-of-training report follows
LABELLED_POINTS = 200           # the embedding projection labels every token of a vocabulary this small
TOP_K = 10                      # next-token probabilities shown


# ----------------------------------------------------------------------------------------------------
# Figures and tokens
# ----------------------------------------------------------------------------------------------------

@dataclass
class Figure:
    name: str               # the PNG's file name without .png; the arrays are saved as name_KEY.npy
    title: str
    caption: str            # HTML: what to look for
    png: bytes
    arrays: dict = field(default_factory=dict)     # what the picture shows, {key: array}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _plain(text):
    """Text for a matplotlib label: it reads "$...$" as math, and a token's "$" is a dollar sign."""
    return text.replace("$", r"\$")


def _png(fig):
    """The figure as PNG bytes; closes it."""
    plt = _pyplot()
    buffer = io.BytesIO()
    with warnings.catch_warnings():          # a glyph the font lacks (an emoji token) draws as a box
        warnings.simplefilter("ignore", UserWarning)
        fig.savefig(buffer, format="png", bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    return buffer.getvalue()


def token_label(tokenizer, token_id):
    """One token as a readable label: its text with a space shown as '␣', a newline as '\\n' (and other
    control characters escaped); bytes that are not whole UTF-8 characters (a BPE token can hold part
    of one) as escapes, e.g. '\\xe2\\x80'."""
    raw = tokenizer.token_bytes(int(token_id))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return repr(raw)[2:-1]
    shown = "".join(c if c.isprintable() and c != " " else
                    "␣" if c == " " else repr(c)[1:-1] for c in text)
    return shown or "''"


def prompt_tokens(tokenizer, prompt, block_size):
    """--prompt -> (ids (T,) int64 with 1 <= T <= block_size, notes to print). A prompt longer than the
    context keeps its last block_size tokens, as generation does, and says so. Raises GptcoreError for
    an empty prompt and for characters outside the vocabulary."""
    if not prompt:
        raise GptcoreError("--prompt is empty: give at least one character of text to follow through the model")
    try:
        ids = np.asarray(tokenizer.encode(prompt), np.int64)
    except GptcoreError as e:
        raise GptcoreError(f"--prompt: {e}") from None
    notes = []
    if len(ids) > block_size:
        notes.append(f"the prompt has {len(ids)} tokens, more than the model's context (block_size "
                     f"{block_size}): the pictures use its last {block_size}")
        ids = ids[-block_size:]
    return ids, notes


def _tick_labels(ax, labels, axis="both", max_labels=32):
    """Tokens as tick labels, every k-th one when there are more than max_labels."""
    step = max(1, math.ceil(len(labels) / max_labels))
    ticks = list(range(0, len(labels), step))
    labels = [_plain(label) for label in labels]
    size = 9 if len(ticks) <= 16 else 7
    if axis in ("both", "x"):
        ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=size, fontfamily="monospace")
    if axis in ("both", "y"):
        ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=size, fontfamily="monospace")


# ----------------------------------------------------------------------------------------------------
# The model: attention, embeddings, the forward step by step (one forward of the prompt)
# ----------------------------------------------------------------------------------------------------

def attention_figures(model, labels):
    """One figure per block: every head's attention matrix (NH, T, T) of the last forward (batch row
    0), then the last position's attention in every block. Arrays: the matrices, as plotted."""
    plt = _pyplot()
    L, NH = model.config.n_layer, model.config.n_head
    T = len(labels)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#e8e8e8")   # grey above the diagonal: the future
    columns = min(NH, 4 if T <= 16 else 2)          # a long prompt gets bigger panels, for its labels
    rows = math.ceil(NH / columns)
    panel = min(7.0, 3.0 + 0.1 * T)                 # inches
    figures, last_rows = [], []
    for layer in range(L):
        att = model.attention_weights(layer)[0]                                  # (NH, T, T)
        last_rows.append(att[:, T - 1, :])
        fig, axes = plt.subplots(rows, columns, figsize=(panel * columns + 2.0, panel * rows + 1.0),
                                 squeeze=False)
        fig.subplots_adjust(left=0.08, right=0.88, bottom=0.08, top=0.92, wspace=0.25, hspace=0.25)
        for head in range(rows * columns):
            ax = axes[head // columns][head % columns]
            if head >= NH:
                ax.axis("off")
                continue
            shown = np.ma.masked_where(np.triu(np.ones((T, T), bool), k=1), att[head])
            image = ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"head {head}", fontsize=10)
            _tick_labels(ax, labels)
            if head % columns == 0:
                ax.set_ylabel("query t (looks)")
            if head // columns == rows - 1:
                ax.set_xlabel("key s (looked at)")
        fig.colorbar(image, cax=fig.add_axes([0.9, 0.3, 0.015, 0.4]), label="attention weight att[t, s]")
        fig.suptitle(f"block {layer}: attention of every head (each row sums to 1)")
        figures.append(Figure(
            f"attention_layer{layer}", f"Block {layer}: attention",
            "Row t is where position t looks: a distribution over the positions s &le; t. Row 0 is "
            "always a single 1 (the first token can only look at itself); grey cells lie in the future.",
            _png(fig), {"": att}))
    # the last position, every block: which earlier tokens feed the next-token prediction
    last = np.stack(last_rows)                                                   # (L, NH, T)
    fig, axes = plt.subplots(L, 1, figsize=(min(14.0, 3.0 + 0.28 * T), 0.9 + (0.3 * NH + 0.5) * L),
                             squeeze=False)
    for layer in range(L):
        ax = axes[layer][0]
        image = ax.imshow(last[layer], cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto",
                          interpolation="nearest")
        ax.set_yticks(range(NH), [f"h{h}" for h in range(NH)], fontsize=8)
        ax.set_ylabel(f"block {layer}", fontsize=9)
        _tick_labels(ax, labels, axis="x", max_labels=48)
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
    fig.suptitle(f"where the last token ({_plain(labels[-1])}) looks, in every block and head")
    figures.append(Figure(
        "attention_last_position", "Where the last position looks",
        "The last row of every attention matrix: the positions whose values are mixed into the "
        "prediction of the next token.", _png(fig), {"": last}))
    return figures, last


_VOWELS = set("aeiouAEIOU")
_CATEGORIES = ["vowel", "consonant", "digit", "punctuation", "space or control", "other"]


def _category(label_text):
    """The kind of a token's first visible character, to colour the embedding projection."""
    text = label_text.lstrip()
    if not text:
        return "space or control"
    c = text[0]
    if c in _VOWELS:
        return "vowel"
    if c.isascii() and c.isalpha():
        return "consonant"
    if c.isdigit():
        return "digit"
    if c.isascii() and not c.isalnum():
        return "punctuation"
    return "other"


def principal_axes(matrix, k=2):
    """matrix (N, C) -> (projection (N, k) onto its top k principal axes, explained variance ratios
    (k,)): centre the rows, SVD, project. PCA with numpy alone."""
    centred = matrix.astype(np.float64) - matrix.mean(axis=0, dtype=np.float64)
    _, singular, axes = np.linalg.svd(centred, full_matrices=False)
    variance = singular ** 2
    return centred @ axes[:k].T, variance[:k] / variance.sum()


def cosine_similarity(matrix):
    """matrix (N, C) -> (N, N): the cosine of the angle between every pair of rows."""
    rows = matrix.astype(np.float64)
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    return rows @ rows.T


def embedding_figures(model, tokenizer, ids):
    plt = _pyplot()
    wte, wpe = model.params["wte.weight"], model.params["wpe.weight"]
    V = wte.shape[0]
    projection, explained = principal_axes(wte)
    texts = [tokenizer.token_bytes(i).decode("utf-8", "replace") for i in range(V)]
    labels = [token_label(tokenizer, i) for i in range(V)]
    small = V <= LABELLED_POINTS
    labelled = range(V) if small else sorted(set(int(i) for i in ids))    # a big vocabulary: the prompt's
    fig, ax = plt.subplots(figsize=(9, 7.5))
    colours = dict(zip(_CATEGORIES, plt.get_cmap("tab10").colors))
    kinds = np.array([_category(t) for t in texts])
    for kind in _CATEGORIES:
        where = kinds == kind
        if where.any():
            ax.scatter(projection[where, 0], projection[where, 1], s=14 if small else 2,
                       color=colours[kind], label=kind, alpha=0.8 if small else 0.25)
    for i in labelled:
        if not small:
            ax.scatter(*projection[i], s=30, color=colours[kinds[i]], edgecolors="black", zorder=3)
        ax.annotate(_plain(labels[i]), projection[i], fontsize=9, fontfamily="monospace", xytext=(3, 2),
                    textcoords="offset points", color=colours[kinds[i]] if small else "black", zorder=4)
    ax.set_xlabel(f"principal axis 1 ({explained[0]:.0%} of the variance)")
    ax.set_ylabel(f"principal axis 2 ({explained[1]:.0%} of the variance)")
    ax.set_title(f"token embeddings wte ({V} x {wte.shape[1]}) projected to 2-D"
                 + ("" if small else "; labelled: the prompt's tokens"))
    ax.legend(title="first character", fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    figures = [Figure("embeddings_wte_pca", "Token embeddings (PCA)",
                      "Each token's row of wte, projected onto the two directions along which the rows "
                      "differ most. Tokens the model treats alike sit close together.",
                      _png(fig), {"": projection.astype(np.float32)})]
    similarity = cosine_similarity(wpe)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5))
    limit = float(np.abs(wpe).max()) or 1.0
    image = left.imshow(wpe, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
    left.set_xlabel("channel c")
    left.set_ylabel("position t")
    left.set_title(f"position embeddings wpe ({wpe.shape[0]} x {wpe.shape[1]})")
    fig.colorbar(image, ax=left, shrink=0.8)
    image = right.imshow(similarity, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    right.set_xlabel("position s")
    right.set_ylabel("position t")
    right.set_title("cosine similarity of wpe[t] and wpe[s]")
    fig.colorbar(image, ax=right, shrink=0.8)
    figures.append(Figure("embeddings_wpe", "Position embeddings",
                          "Left: one row per position. Right: how alike two positions' rows are; a trained "
                          "model shows a bright band along the diagonal (nearby positions look alike).",
                          _png(fig), {"": wpe.copy(), "cosine": similarity.astype(np.float32)}))
    return figures


def _rms(array):
    return float(np.sqrt(np.mean(np.square(array, dtype=np.float64))))


def _softmax(logits):
    shifted = np.exp(logits.astype(np.float64) - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _preview(array):
    return " ".join(f"{v:+.3f}" for v in np.asarray(array).ravel()[:4]) + " ..."


def forward_section(model, tokenizer, ids, labels, logits, last_attention):
    """The forward step by step: (HTML tables, a figure of the stream's size and the top next tokens).
    Everything comes from model.activations of the forward that produced `logits` (1, T, V)."""
    plt = _pyplot()
    acts = model.activations
    T, C, V, NH = len(ids), model.config.n_embd, model.config.vocab_size, model.config.n_head
    rows = [("token ids", f"({T},)", "", " ".join(str(int(i)) for i in ids[:12]) + (" ..." if T > 12 else "")),
            ("embeddings wte[id] + wpe[t]", f"({T}, {C})", _rms(acts.blocks[0].x[0]), _preview(acts.blocks[0].x[0]))]
    stages, stage_rms = ["embeddings"], [_rms(acts.blocks[0].x[0])]
    for i, block in enumerate(acts.blocks):
        rows += [(f"block {i}: ln_1, then attention q k v", f"({T}, {3 * C})", _rms(block.attn.qkv[0]),
                  _preview(block.attn.qkv[0])),
                 (f"block {i}: attention weights", f"({NH}, {T}, {T})", "", "rows sum to 1"),
                 (f"block {i}: attention output (added to the stream)", f"({T}, {C})", _rms(block.attn.out[0]),
                  _preview(block.attn.out[0])),
                 (f"block {i}: MLP output (added to the stream: out - x_mid)", f"({T}, {C})",
                  _rms(block.out[0] - block.x_mid[0]), _preview(block.out[0] - block.x_mid[0])),
                 (f"block {i}: output, the residual stream", f"({T}, {C})", _rms(block.out[0]), _preview(block.out[0]))]
        stages.append(f"block {i}")
        stage_rms.append(_rms(block.out[0]))
    rows += [("final LayerNorm ln_f", f"({T}, {C})", _rms(acts.ln_f.out[0]), _preview(acts.ln_f.out[0])),
             ("logits = ln_f @ wte^T", f"({T}, {V})", _rms(logits[0]), _preview(logits[0]))]
    stages.append("ln_f")
    stage_rms.append(_rms(acts.ln_f.out[0]))
    probs = _softmax(logits[0])                                                  # (T, V)
    top = np.argsort(-probs[-1], kind="stable")[:min(TOP_K, V)]
    table = _table(["stage", "shape", "RMS", "first values"],
                   [(name, shape, f"{rms:.3f}" if rms != "" else "", values) for name, shape, rms, values in rows])
    guesses = []
    for t in range(T):
        best = int(np.argmax(probs[t]))
        actual = f"{labels[t + 1]} ({probs[t, ids[t + 1]]:.3f})" if t + 1 < T else "(not in the prompt)"
        guesses.append((t, labels[t], f"{token_label(tokenizer, best)} ({probs[t, best]:.3f})", actual))
    guess_table = _table(["t", "token", "the model's top guess for the next token", "the actual next token"],
                         guesses)
    mean_last = last_attention.mean(axis=1)                                      # (L, T): heads averaged
    summary = _table(["block", "the last position attends most to (mean over heads)"],
                     [(layer, ", ".join(f"{labels[s]} at t={s} ({mean_last[layer, s]:.2f})"
                                        for s in np.argsort(-mean_last[layer], kind="stable")[:3]))
                      for layer in range(mean_last.shape[0])])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    left.bar(range(len(stages)), stage_rms, color="#4c72b0")
    left.set_xticks(range(len(stages)), stages, rotation=45, ha="right")
    left.set_ylabel("RMS over the prompt's positions")
    left.set_title("the residual stream, stage by stage")
    names = [_plain(token_label(tokenizer, int(i))) for i in top]
    right.barh(range(len(top))[::-1], probs[-1, top], color="#dd8452")
    right.set_yticks(range(len(top))[::-1], names, fontfamily="monospace")
    right.set_xlim(0, max(1e-9, float(probs[-1, top[0]])) * 1.15)
    right.set_xlabel("probability")
    right.set_title(f"the next token after ...{_plain(labels[-1])}: the top {len(top)}")
    for rank, i in enumerate(top):
        right.text(probs[-1, i], len(top) - 1 - rank, f" {probs[-1, i]:.3f}", va="center", fontsize=8)
    figure = Figure("forward", "The forward, step by step",
                    "Left: the size of the residual stream after each stage. Right: the probabilities of the "
                    "next token, softmax of the last position's logits.", _png(fig),
                    {"probs": probs[-1].astype(np.float32), "stage_rms": np.array(stage_rms, np.float32)})
    return table, guess_table, summary, figure


def model_pictures(model, tokenizer, ids):
    """One forward of ids (T,) -> (figures, tables): every model picture, from that forward."""
    labels = [token_label(tokenizer, int(i)) for i in ids]
    logits, _ = model.forward(np.asarray(ids, np.int64)[None, :])              # (1, T, V)
    attention, last = attention_figures(model, labels)
    table, guesses, summary, forward = forward_section(model, tokenizer, ids, labels, logits, last)
    tables = {"forward": table, "guesses": guesses, "attention_summary": summary}
    return attention, embedding_figures(model, tokenizer, ids), forward, tables


# ----------------------------------------------------------------------------------------------------
# The run: metrics.jsonl and samples.jsonl
# ----------------------------------------------------------------------------------------------------

def find_run(folder):
    """The training run a --model folder belongs to: the folder itself if it holds metrics.jsonl, the
    run around it if it is one of a run's checkpoints (RUN/checkpoints/step-N), else None."""
    folder = os.path.abspath(folder)
    if os.path.isfile(os.path.join(folder, METRICS)):
        return folder
    parent = os.path.dirname(folder)
    if os.path.basename(parent) == checkpoint.CHECKPOINTS and \
            os.path.isfile(os.path.join(os.path.dirname(parent), METRICS)):
        return os.path.dirname(parent)
    return None


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_records(path):
    if not os.path.exists(path):
        return []
    return read_json_lines(path)[0]


def run_title(run_folder, model):
    """The run's data and model, for the loss curves' title."""
    config = model.config
    shape = (f"{config.n_layer} layers, {config.n_head} heads, n_embd {config.n_embd}, block_size "
             f"{config.block_size}, {model.num_parameters:,} parameters")
    try:
        settings = checkpoint.read_training_settings(run_folder)
    except GptcoreError:
        return shape
    data = settings.get("data") or "the Python standard library"
    return f"{os.path.basename(str(data)) or data} ({settings.get('tokenizer', 'char')} tokens); {shape}"


def _plot_losses(records, title, unit, log_y):
    plt = _pyplot()
    train = [(r["step"], r["train_loss"]) for r in records if not r.get("eval") and _number(r.get("train_loss"))]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("eval") and _number(r.get("val_loss"))]
    resumes = sorted({r["resumed_from"] for r in records if _number(r.get("resumed_from"))})
    fig, ax = plt.subplots(figsize=(9, 4.5))
    if train:
        ax.plot(*zip(*train), label="train (one batch)", linewidth=0.9, alpha=0.75)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=1.6)
    for i, step in enumerate(resumes):
        ax.axvline(step, color="grey", linestyle="--", linewidth=1, label="resumed here" if i == 0 else None)
    if log_y and (train or val):
        from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullLocator
        values = [loss for _, loss in train + val if loss > 0]
        ax.set_yscale("log")
        # ticks evenly spaced in log, labelled as plain numbers: a loss curve spans less than a decade
        ax.yaxis.set_major_locator(FixedLocator(np.geomspace(min(values), max(values), 7)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("step")
    ax.set_ylabel(f"cross-entropy (nats per {unit})")
    ax.set_title(_plain(title), fontsize=10)
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    return _png(fig)


def run_figures(records, title, unit):
    """Loss curves (linear and log y), learning rate and tokens/s."""
    plt = _pyplot()
    figures = [Figure("run_loss", "Loss", "Training loss on each logged batch, validation loss at each "
                      "evaluation.", _plot_losses(records, title, unit, log_y=False)),
               Figure("run_loss_log", "Loss (log y)", "The same curves on a log scale, where the late, small "
                      "improvements stay visible.", _plot_losses(records, title, unit, log_y=True))]
    lr = [(r["step"], r["lr"]) for r in records if _number(r.get("lr"))]
    speed = [(r["step"], r["tokens_per_sec"]) for r in records if _number(r.get("tokens_per_sec"))]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    if lr:
        left.plot(*zip(*sorted(lr)), color="#55a868")
    left.set_xlabel("step")
    left.set_ylabel("learning rate")
    left.set_title("learning rate (warmup, then cosine decay)")
    left.grid(alpha=0.3)
    if speed:
        right.plot(*zip(*speed), color="#8172b2")
    right.set_xlabel("step")
    right.set_ylabel("tokens / s")
    right.set_title("training speed")
    right.grid(alpha=0.3)
    right.set_ylim(bottom=0)
    figures.append(Figure("run_schedule", "Learning rate and speed", "", _png(fig)))
    return figures


# the matrices (the tensors weight decay applies to) by kind, as the report's curves group them
_MATRIX_KINDS = ["wte.weight", "wpe.weight", "attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                 "mlp.c_proj.weight"]


def _matrix_kind(name):
    """'h.3.attn.c_proj.weight' -> 'attn.c_proj.weight'; None for a vector (a bias, a LayerNorm weight)."""
    kind = name.split(".", 2)[2] if name.startswith("h.") else name
    return kind if kind in _MATRIX_KINDS else None


def dynamics_figures(records, n_layer):
    """The statistics gptcore.dynamics recorded at each evaluation, against the step: one figure of four
    panels (block output RMS, attention entropy, gradient RMS and update/weight of the matrices)."""
    plt = _pyplot()
    points = [(r["step"], r["dynamics"]) for r in records if r.get("eval") and isinstance(r.get("dynamics"), dict)]
    if not points:
        return []
    steps = [step for step, _ in points]
    layer_colours = plt.get_cmap("viridis")(np.linspace(0, 0.85, max(n_layer, 1)))
    kind_colours = dict(zip(_MATRIX_KINDS, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (stream, entropy), (gradient, update) = axes
    for layer in range(n_layer):
        stream.plot(steps, [d["block_out_rms"][layer] for _, d in points], "o-", color=layer_colours[layer],
                    label=f"block {layer}")
        entropy.plot(steps, [d["attn_entropy"][layer] for _, d in points], "o-", color=layer_colours[layer],
                     label=f"block {layer}")
    uniform = points[-1][1]["attn_entropy_uniform"]
    entropy.axhline(uniform, color="grey", linestyle="--", label="uniform attention (the maximum)")
    entropy.set_ylim(0, uniform * 1.1)
    stream.set_title("RMS of each block's output (the residual stream)")
    entropy.set_title("attention entropy, mean over heads and positions (nats)")
    for ax, key, title in [(gradient, "grad_rms", "gradient RMS of each matrix (before clipping)"),
                           (update, "update_ratio", "update / weight = rms(change in one step) / rms(weight)")]:
        seen = set()
        for name in points[-1][1][key]:
            kind = _matrix_kind(name)
            if kind is None:
                continue
            values = [d[key].get(name) for _, d in points]
            values = [v if _number(v) and v > 0 else np.nan for v in values]
            ax.plot(steps, values, "-", color=kind_colours[kind], linewidth=1.2, alpha=0.8,
                    label=None if kind in seen else kind)
            seen.add(kind)
        ax.set_yscale("log")
        ax.minorticks_off()
        ax.set_title(title)
    update.axhline(1e-3, color="red", linestyle="--", linewidth=1, label="1e-3, the rule of thumb")
    for ax in (stream, entropy, gradient, update):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.subplots_adjust(hspace=0.35)
    return [Figure("dynamics", "Training dynamics",
                   "Top left: how big the residual stream is after each block. Top right: how spread out "
                   "attention is (0: every position looks at one token only). Bottom: each weight matrix's "
                   "gradient, and how far one AdamW step moves it relative to its size, one line per matrix "
                   "(one per block for the blocks' own); near the dashed 1e-3 the learning rate is in the "
                   "usual range, far above it too high, far below the matrix hardly learns. The vectors "
                   "(biases, LayerNorm weights) are in metrics.jsonl.", _png(fig))]


# ----------------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 0 auto;
       max-width: 1200px; padding: 1em 2em; color: #222; background: #fff; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .92em; max-width: 60em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
td, th { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; white-space: pre-wrap; border: 1px solid #eee; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: .4em .8em; }
.toggle input { margin-left: 1em; }
#linear:checked ~ .log-y { display: none; } #log:checked ~ .linear-y { display: none; }
"""


def _table(header, rows):
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure_html(figure, css_class=None):
    data = base64.b64encode(figure.png).decode("ascii")
    attribute = f' class="{css_class}"' if css_class else ""
    return (f'<figure{attribute}><img src="data:image/png;base64,{data}" alt="{html.escape(figure.title)}">'
            f"<figcaption><b>{html.escape(figure.title)}.</b> {figure.caption}</figcaption></figure>")


def _run_section(run_folder, model, tokenizer, records, samples):
    """(HTML, figures) of the run: its curves, its statistics, its samples."""
    figures = run_figures(records, run_title(run_folder, model), tokenizer.unit)
    loss, loss_log, schedule = figures
    parts = ['<h2>The run</h2>',
             '<div class="toggle">y axis: <input type="radio" name="y" id="linear" checked>'
             '<label for="linear">linear</label><input type="radio" name="y" id="log">'
             '<label for="log">log</label>',
             _figure_html(loss, "linear-y"), _figure_html(loss_log, "log-y"), "</div>", _figure_html(schedule)]
    dynamics = dynamics_figures(records, model.config.n_layer)
    parts.append("<h2>Training dynamics (recorded at each evaluation)</h2>")
    if dynamics:
        parts += [_figure_html(f) for f in dynamics]
    else:
        parts.append('<p class="note">No statistics yet: they are recorded at each evaluation after the '
                     'first (the step before it must have run in this run).</p>')
    parts.append("<h2>Samples printed during training</h2>")
    if samples:
        parts += [f"<h3>step {int(s['step'])}</h3><pre>{html.escape(str(s.get('sample', '')))}</pre>"
                  for s in samples]
    else:
        parts.append("<p>None yet: gptcore train prints a sample at the end of a run (--sample-tokens).</p>")
    return "\n".join(parts), figures + dynamics


def _model_section(model, tokenizer, ids):
    attention, embeddings, forward, tables = model_pictures(model, tokenizer, ids)
    prompt = "".join(token_label(tokenizer, int(i)) for i in ids) if len(ids) <= 200 else ""
    parts = [f"<h2>The prompt</h2><p>{len(ids)} tokens: <code>{html.escape(prompt)}</code></p>",
             "<h2>The forward, step by step</h2>", tables["forward"], _figure_html(forward),
             "<h3>The model's guess at every position</h3>", tables["guesses"],
             "<h2>Attention</h2>", tables["attention_summary"]]
    parts += [_figure_html(f) for f in attention]
    parts += ["<h2>Embeddings</h2>"] + [_figure_html(f) for f in embeddings]
    return "\n".join(parts), attention + [forward] + embeddings


def report_html(title, notes, sections):
    notes_html = "".join(f'<p class="note">{html.escape(note)}</p>' for note in notes)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{notes_html}"
            + "\n".join(sections) + "</body></html>\n")


def _run_records(run_folder):
    return _read_records(os.path.join(run_folder, METRICS)), _read_records(os.path.join(run_folder, SAMPLES))


def visualize(model, tokenizer, ids, out_folder, run_folder=None, notes=()):
    """Draw every picture of the forward of ids (T,), and of the run in run_folder if given, into
    out_folder: one PNG per picture, its arrays as .npy next to it, and report.html holding them all.
    Returns {file name: array} of every array saved, e.g. "attention_layer0.npy" -> (NH, T, T)."""
    try:
        os.makedirs(out_folder, exist_ok=True)
    except OSError as e:
        raise GptcoreError(f"cannot create --out {out_folder}: {e.strerror or e}") from None
    sections, figures = [], []
    if run_folder is not None:
        run_html, run_figs = _run_section(run_folder, model, tokenizer, *_run_records(run_folder))
    model_html, model_figs = _model_section(model, tokenizer, ids)
    sections.append(model_html)
    figures += model_figs
    if run_folder is not None:
        sections.append(run_html)
        figures += run_figs
    saved = {}
    for figure in figures:
        atomic_write(os.path.join(out_folder, figure.name + ".png"), figure.png)
        for key, array in figure.arrays.items():
            name = f"{figure.name}{'_' + key if key else ''}.npy"
            buffer = io.BytesIO()
            np.save(buffer, array)
            atomic_write(os.path.join(out_folder, name), buffer.getvalue())
            saved[name] = array
    title = f"gptcore: inside the model{' of ' + os.path.basename(run_folder) if run_folder else ''}"
    atomic_write(os.path.join(out_folder, REPORT), report_html(title, notes, sections).encode("utf-8"))
    return saved


def write_run_report(run_folder, model, tokenizer, prompt_ids=None):
    """RUN/report.html for gptcore train: the run's curves, statistics and samples; with prompt_ids
    (T,) also the model's pictures on them. Written atomically; no PNG files beside it."""
    run_html, _ = _run_section(run_folder, model, tokenizer, *_run_records(run_folder))
    sections, notes = [run_html], []
    if prompt_ids is not None and len(prompt_ids):
        sections.insert(0, _model_section(model, tokenizer, np.asarray(prompt_ids, np.int64))[0])
        notes.append("The model's pictures follow the first tokens of the validation text; "
                     f"gptcore visualize --model {run_folder} --prompt TEXT draws them for any text.")
    else:
        notes.append("Training is under way: the model's pictures (attention, embeddings, the forward) are "
                     "added at the end of the run; gptcore visualize --model RUN --prompt TEXT draws them "
                     "at any time.")
    page = report_html(f"gptcore run {os.path.basename(os.path.abspath(run_folder))}", notes, sections)
    atomic_write(os.path.join(run_folder, REPORT), page.encode("utf-8"))

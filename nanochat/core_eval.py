"""
The CORE metric (DCLM paper, as used by nanochat): a bundle of in-context-learning tasks,
each scored by accuracy, centered against its random-guess baseline and averaged.

Three task types:
- multiple_choice: {query, choices, gold}. One sequence per choice: the shared context
  (few-shot examples + query + delimiter) followed by the choice. Scored span: from the end
  of the common token prefix of all the choices' sequences to each sequence's end (tokens
  every choice starts with are not scored). The lowest mean loss over its span wins.
- schema: {context_options, continuation, gold}. One sequence per context option, all with
  the same continuation. Scored span: the common token suffix of all the options'
  sequences. The option under which that suffix has the lowest mean loss wins.
- language_modeling: {context, continuation}. Correct iff greedy decoding (argmax at every
  continuation position, teacher-forced) reproduces the continuation tokens exactly.
  Scored span: from the end of the tokenized context, stripped of its trailing whitespace, to
  the end (a delimiter space that stays a token of its own, before a digit, is scored).
These spans are upstream nanochat's, so CORE numbers compare with its published ones.

The eval bundle (upstream nanochat / DCLM layout) is a zip holding
    eval_bundle/core.yaml            icl_tasks: [{label, dataset_uri, num_fewshot: [k],
                                                  icl_task_type, continuation_delimiter}]
    eval_bundle/eval_meta_data.csv   columns "Eval Task", "Random baseline" (percent), ...
    eval_bundle/eval_data/<dataset_uri>   one JSON example per line
It is downloaded once and extracted into <base>/eval_bundle.
"""

import os
import csv
import json
import time
import random
import shutil
import zipfile
import tempfile
import urllib.request

import yaml
import torch
import torch.nn.functional as F
import torch.distributed as dist

from nanochat.common import UserError, get_base_dir, get_dist_info, atomic_path, print0

DEFAULT_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
SOURCE_FILE = "source_url.txt"  # in the extracted bundle: the URL it came from
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")

# -----------------------------------------------------------------------------
# Rendering: text of the sequences for one example

def render_sequences(example, fewshot, task_type, delimiter):
    """Return a list of (context, continuation) text pairs, one per sequence to score.
    Few-shot examples are shown with their correct answer and separated by blank lines."""
    if task_type == "multiple_choice":
        shots = [f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}" for ex in fewshot]
        context = "\n\n".join(shots + [f"{example['query']}{delimiter}"])
        return [(context, choice) for choice in example["choices"]]
    if task_type == "schema":
        shots = [f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}" for ex in fewshot]
        return [("\n\n".join(shots + [f"{option}{delimiter}"]), example["continuation"])
                for option in example["context_options"]]
    if task_type == "language_modeling":
        shots = [f"{ex['context'].strip()}{delimiter}{ex['continuation']}" for ex in fewshot]
        context = "\n\n".join(shots + [f"{example['context'].strip()}{delimiter}"])
        return [(context, example["continuation"])]
    raise UserError(f"unknown ICL task type {task_type!r} (expected one of {', '.join(TASK_TYPES)})")


def common_prefix_len(seqs):
    """Number of leading tokens shared by every list in seqs."""
    n = 0
    for column in zip(*seqs):
        if any(x != column[0] for x in column):
            break
        n += 1
    return n


def common_suffix_len(seqs):
    """Number of trailing tokens shared by every list in seqs."""
    return common_prefix_len([list(reversed(ids)) for ids in seqs])


def scored_spans(tokenizer, pairs, task_type):
    """Tokenize each context+continuation as one string (BOS first) and pick the scored
    span of each sequence, as upstream nanochat does:
    - multiple_choice (same context, one continuation per choice): from the end of the
      common prefix of all sequences to each sequence's end, so leading tokens that every
      choice shares ("the" of "the sun" / "the moon") are context, not scored;
    - schema (one context per option, same continuation): the common suffix of all
      sequences, so only the shared continuation tokens are scored;
    - language_modeling (one pair): from the end of the tokenized context, stripped as upstream
      strips it, to the end: "Answer: 1812" scores " ", "1", "8", ... where the split pattern
      keeps the space apart from the digits (the common prefix when the stripped context's
      tokens are not a prefix of the whole; upstream asserts they are).
    Tokenizing the whole string matters: a delimiter space at the end of the context merges
    into the first continuation token (" Paris"), exactly as the model saw text in training.
    Returns a list of (ids, start): the scored tokens are ids[start:]."""
    bos = tokenizer.get_bos_token_id()
    fulls = tokenizer.encode([c + k for c, k in pairs], prepend=bos)
    if task_type == "multiple_choice":
        prefix = common_prefix_len(fulls)
        starts = [prefix] * len(fulls)
    elif task_type == "schema":
        suffix = common_suffix_len(fulls)
        starts = [len(ids) - suffix for ids in fulls]
    elif task_type == "language_modeling":
        contexts = tokenizer.encode([c.strip() for c, _ in pairs], prepend=bos)
        starts = [len(ctx) if ids[:len(ctx)] == ctx else common_prefix_len([ctx, ids]) for ctx, ids in zip(contexts, fulls)]
    else:
        raise UserError(f"unknown ICL task type {task_type!r} (expected one of {', '.join(TASK_TYPES)})")
    # degenerate cases only (a single choice, identical sequences, a choice that is a prefix
    # of another): score at least the last token, and never the BOS
    return [(ids, max(min(start, len(ids) - 1), 1)) for ids, start in zip(fulls, starts)]


def tokenize_sequences(tokenizer, pairs, task_type, max_seq_len=None):
    """scored_spans, then sequences longer than max_seq_len are cropped from the left
    (keeping the scored tail) and their span start shifts left by the cropped amount.
    Returns a list of (ids, start, end): the scored tokens are ids[start:end]."""
    seqs = []
    for ids, start in scored_spans(tokenizer, pairs, task_type):
        if max_seq_len is not None and len(ids) > max_seq_len:
            crop = len(ids) - max_seq_len
            ids = ids[crop:]
            start = max(start - crop, 1)  # position 0 has no prediction; a too-long span loses its head
        seqs.append((ids, start, len(ids)))
    return seqs


# -----------------------------------------------------------------------------
# Scoring one example

def sample_fewshot(data, idx, num_fewshot):
    """Deterministic per example: the same example always gets the same shots, never itself."""
    if num_fewshot <= 0:
        return []
    rng = random.Random(1234 + idx)
    others = [i for i in range(len(data)) if i != idx]
    return [data[i] for i in rng.sample(others, min(num_fewshot, len(others)))]


def model_max_seq_len(model):
    """The longest sequence the model can read, or None. Upstream crops only a model that declares
    max_seq_len (its Hugging Face wrappers) and feeds its own GPT whole examples, past sequence_len;
    ours reads up to its rotary table (10x sequence_len), so that is where it is cropped."""
    limit = getattr(model, "max_seq_len", None)
    if limit is None and isinstance(getattr(model, "cos", None), torch.Tensor):
        limit = model.cos.size(1)
    return limit


@torch.no_grad()
def forward_sequences(model, seqs, pad_id, device):
    """One forward over all sequences of an example, right-padded with pad_id (padding sits
    after every continuation, so causal attention keeps it from touching scored positions).
    Returns per-row mean continuation loss [N] and per-row exact-greedy-match flags [N]."""
    N, T = len(seqs), max(len(ids) for ids, _, _ in seqs)
    idx = torch.full((N, T), pad_id, dtype=torch.long)
    mask = torch.zeros((N, T), dtype=torch.bool)  # True where ids[t] is a continuation token
    for i, (ids, start, end) in enumerate(seqs):
        idx[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, start:end] = True
    idx, mask = idx.to(device), mask.to(device)
    logits = model(idx).float()  # (N, T, V)
    # position t-1 predicts token t
    pred_logits, targets, pred_mask = logits[:, :-1], idx[:, 1:], mask[:, 1:]  # (N, T-1, V), (N, T-1)
    losses = F.cross_entropy(pred_logits.transpose(1, 2), targets, reduction="none")  # (N, T-1)
    mean_loss = (losses * pred_mask).sum(1) / pred_mask.sum(1)  # (N,)
    hits = (pred_logits.argmax(-1) == targets) | ~pred_mask  # (N, T-1)
    return mean_loss, hits.all(1)


def evaluate_example(idx, model, tokenizer, data, device, task_meta):
    """True iff the model gets data[idx] right."""
    example = data[idx]
    task_type = task_meta["task_type"]
    fewshot = sample_fewshot(data, idx, task_meta["num_fewshot"])
    pairs = render_sequences(example, fewshot, task_type, task_meta["continuation_delimiter"])
    seqs = tokenize_sequences(tokenizer, pairs, task_type, model_max_seq_len(model))
    mean_loss, greedy_match = forward_sequences(model, seqs, tokenizer.get_bos_token_id(), device)
    if task_type == "language_modeling":
        return bool(greedy_match[0].item())
    return mean_loss.argmin().item() == example["gold"]


def evaluate_task(model, tokenizer, data, device, task_meta):
    """Accuracy over data. Under DDP each rank takes examples rank, rank+world, ... and the
    correct counts are summed across ranks, so every rank returns the same number."""
    _, rank, _, world_size = get_dist_info()
    correct = torch.zeros(len(data), dtype=torch.float32, device=device)
    for idx in range(rank, len(data), world_size):
        correct[idx] = float(evaluate_example(idx, model, tokenizer, data, device, task_meta))
    if dist.is_available() and dist.is_initialized() and world_size > 1:
        dist.all_reduce(correct, op=dist.ReduceOp.SUM)
    return correct.sum().item() / len(data)


def centered_accuracy(accuracy, random_baseline):
    """random_baseline is in percent (as in eval_meta_data.csv): 0 = chance, 1 = perfect."""
    chance = 0.01 * random_baseline
    return (accuracy - chance) / (1.0 - chance)


# -----------------------------------------------------------------------------
# The bundle: download, extract, read

def download_file(url, path, retries=5, backoff=1.0, timeout=60):
    """Download url to path atomically (temp name, then rename), retrying failed or
    truncated transfers. Raises UserError when every attempt fails."""
    last_error = None
    for attempt in range(retries):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, atomic_path(path) as tmp:
                expected = response.headers.get("Content-Length")
                with open(tmp, "wb") as f:
                    shutil.copyfileobj(response, f, 1 << 20)
                got = os.path.getsize(tmp)
                if expected is not None and got != int(expected):
                    raise IOError(f"truncated download: got {got} of {expected} bytes")
            return path
        except Exception as e:  # network errors, http errors, IncompleteRead, truncation
            last_error = e
            print0(f"download of {url} failed (attempt {attempt + 1}/{retries}): {e}")
            if attempt + 1 < retries:
                time.sleep(backoff * 2 ** attempt)
    raise UserError(f"could not download {url} after {retries} attempts: {last_error}")


def extract_bundle(zip_path, bundle_dir):
    """Extract the zip's eval_bundle/ folder to bundle_dir via a temp dir and one rename."""
    parent = os.path.dirname(os.path.abspath(bundle_dir))
    tmp_dir = tempfile.mkdtemp(dir=parent, prefix=".eval_bundle.")
    try:
        try:
            with zipfile.ZipFile(zip_path) as zf:
                zf.extractall(tmp_dir)  # checks every member's CRC; drops absolute paths and ".." parts
        except (zipfile.BadZipFile, EOFError) as e:
            raise UserError(f"{zip_path} is not a valid eval bundle zip ({e}); delete it and retry") from e
        extracted = os.path.join(tmp_dir, "eval_bundle")
        if not os.path.isfile(os.path.join(extracted, "core.yaml")):
            raise UserError(f"{zip_path} has no eval_bundle/core.yaml; delete it and retry")
        try:
            os.rename(extracted, bundle_dir)
        except OSError:
            if not os.path.isfile(os.path.join(bundle_dir, "core.yaml")):  # else someone else won the race
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return bundle_dir


def get_eval_bundle(url=None, base_dir=None, retries=5, backoff=1.0):
    """Path of the extracted bundle, downloading and extracting it first if needed.
    url: explicit > $NANOCHAT_EVAL_BUNDLE_URL > upstream's public URL. Under DDP rank 0
    fetches while the other ranks wait at a barrier."""
    base_dir = base_dir or get_base_dir()
    bundle_dir = os.path.join(base_dir, "eval_bundle")
    zip_path = os.path.join(base_dir, "eval_bundle.zip")
    asked = url or os.environ.get("NANOCHAT_EVAL_BUNDLE_URL")  # None: whatever bundle is cached (upstream's by default)
    url = asked or DEFAULT_BUNDLE_URL
    source_file = os.path.join(bundle_dir, SOURCE_FILE)  # the URL a bundle was downloaded from, when this code fetched it
    _, rank, _, _ = get_dist_info()
    if rank == 0 and not os.path.isfile(os.path.join(bundle_dir, "core.yaml")):
        fetched = not os.path.isfile(zip_path)
        if fetched:
            print0(f"downloading eval bundle from {url}")
            download_file(url, zip_path, retries=retries, backoff=backoff)
        try:
            extract_bundle(zip_path, bundle_dir)
        except UserError:
            os.remove(zip_path)  # a corrupt zip must not block the next attempt
            raise
        if fetched:
            with atomic_path(source_file) as tmp, open(tmp, "w", encoding="utf-8") as f:
                f.write(url + "\n")
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if not os.path.isfile(os.path.join(bundle_dir, "core.yaml")):
        raise UserError(f"eval bundle missing at {bundle_dir}")
    if asked and os.path.isfile(source_file):
        with open(source_file, encoding="utf-8") as f:
            cached = f.read().strip()
        if cached != asked:  # it scored the cached bundle's tasks under the other URL's name
            raise UserError(f"the eval bundle cached at {bundle_dir} came from {cached}, not {asked}: remove it and "
                            f"{zip_path} to fetch that one, or drop --bundle-url / $NANOCHAT_EVAL_BUNDLE_URL")
    return bundle_dir


def load_bundle_tasks(bundle_dir):
    """[(task_meta, random_baseline, data)] for every task listed in core.yaml. A damaged bundle
    (a file missing or unreadable, a line that is not JSON, a field missing) is refused in one
    line that names the file."""
    def damaged(name, e):
        return UserError(f"eval bundle {bundle_dir}: {name}: {type(e).__name__}: {' '.join(str(e).split())} "
                         f"(remove {bundle_dir} and its .zip to fetch it again)")

    try:
        with open(os.path.join(bundle_dir, "core.yaml"), encoding="utf-8") as f:
            entries = yaml.safe_load(f)["icl_tasks"]
        entries = [(e["label"], e["icl_task_type"], e["num_fewshot"], e.get("continuation_delimiter", " "), e["dataset_uri"])
                   for e in entries]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError) as e:
        raise damaged("core.yaml", e) from None
    try:
        with open(os.path.join(bundle_dir, "eval_meta_data.csv"), encoding="utf-8", newline="") as f:
            baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError) as e:
        raise damaged("eval_meta_data.csv", e) from None
    tasks = []
    for label, task_type, num_fewshot, delimiter, uri in entries:
        if label not in baselines:
            raise UserError(f"task {label!r} has no row in eval_meta_data.csv")
        if task_type not in TASK_TYPES:
            raise UserError(f"task {label!r}: unknown icl_task_type {task_type!r}")
        task_meta = {
            "label": label,
            "task_type": task_type,
            "num_fewshot": num_fewshot[0] if isinstance(num_fewshot, list) else num_fewshot,
            "continuation_delimiter": delimiter,
        }
        try:
            with open(os.path.join(bundle_dir, "eval_data", uri), encoding="utf-8") as f:
                data = [json.loads(line) for line in f if line.strip()]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise damaged(f"eval_data/{uri}", e) from None
        tasks.append((task_meta, baselines[label], data))
    return tasks


def evaluate_core(model, tokenizer, device, bundle_dir=None, max_per_task=-1, tasks=None):
    """Run every task of the bundle (default: get_eval_bundle()), or the tasks load_bundle_tasks
    read from it. Returns {"results": {label: accuracy}, "centered_results": {label: centered},
    "core_metric": mean centered}."""
    tasks = load_bundle_tasks(bundle_dir or get_eval_bundle()) if tasks is None else tasks
    results, centered_results = {}, {}
    for task_meta, random_baseline, data in tasks:
        if not data:
            raise UserError(f"task {task_meta['label']!r} has no examples")
        t0 = time.time()
        data = list(data)
        random.Random(1337).shuffle(data)  # fixed order so --max-per-task takes a fixed subset (the same one every call)
        if max_per_task > 0:
            data = data[:max_per_task]
        accuracy = evaluate_task(model, tokenizer, data, device, task_meta)
        label = task_meta["label"]
        results[label] = accuracy
        centered_results[label] = centered_accuracy(accuracy, random_baseline)
        print0(f"{label:<40} accuracy {accuracy:.4f} | centered {centered_results[label]:+.4f} | {time.time() - t0:.1f}s")
    core_metric = sum(centered_results.values()) / max(len(centered_results), 1)
    return {"results": results, "centered_results": centered_results, "core_metric": core_metric}

"""
Chat tasks: datasets of conversations for fine-tuning, RL and evaluation.

Every task is list-like: len(task) and task[i] -> {"messages": [{"role", "content"}, ...], ...}.
Hub-backed (need `datasets` and a download, or local files via data_files=):
    SmolTalk, MMLU, ARC, GSM8K, HumanEval
Offline (generated or written here, no download):
    Arithmetic, Spelling, Identity
Combinators: TaskMixture (shuffled union), TaskSequence (concatenation), in tasks.common.
"""

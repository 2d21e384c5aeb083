"""
MMLU (cais/mmlu): 4-way multiple choice over 57 subjects. Subsets "all" (splits test 14K,
validation 1.5K, dev 285) and "auxiliary_train" (split "train", ~100K questions from other
multiple-choice sets, used for SFT). Rows: question, subject, choices (4 strings), answer (0-3).
The rows are stored sorted by subject, so they are served in upstream's shuffled order (seed 42):
any prefix (stop=N) is a mix of subjects.
"""

from tasks.common import Task, load_rows, shuffled, mc_conversation, evaluate_mc


class MMLU(Task):
    eval_type = "categorical"

    def __init__(self, subset="all", split="test", data_files=None, shuffle_seed=42, **kwargs):
        super().__init__(**kwargs)
        assert subset in ("all", "auxiliary_train"), f"MMLU subset must be all or auxiliary_train, got {subset!r}"
        if subset == "auxiliary_train":
            assert split == "train", "MMLU auxiliary_train has only the train split"
        else:
            assert split in ("test", "validation", "dev"), f"MMLU 'all' split must be test, validation or dev, got {split!r}"
        self.subset, self.split = subset, split
        self.rows = shuffled(load_rows("cais/mmlu", subset, split, data_files=data_files), shuffle_seed)

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        if "question" not in row and "train" in row:  # some revisions of auxiliary_train nest each row under "train"
            row = row["train"]
        choices, answer = list(row["choices"]), int(row["answer"])
        assert 0 <= answer < len(choices), f"MMLU answer {answer} out of range for {len(choices)} choices"
        subject = row.get("subject") or ""
        return mc_conversation(row["question"], choices, answer, subject=subject)

    def evaluate(self, conversation, assistant_response):
        return evaluate_mc(conversation, assistant_response)

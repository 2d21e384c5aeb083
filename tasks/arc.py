"""
ARC (allenai/ai2_arc): grade-school science multiple choice. Subsets "ARC-Easy" and
"ARC-Challenge", splits train / validation / test. Rows: id, question,
choices {"text": [...], "label": [...]}, answerKey. Labels are usually A-D but some rows use
1-4 (and a few have 3 or 5 choices): the choices are re-lettered A, B, C ... in order and the
gold letter follows its label.
"""

from tasks.common import Task, load_rows, shuffled, mc_conversation, evaluate_mc


class ARC(Task):
    eval_type = "categorical"

    def __init__(self, subset="ARC-Easy", split="test", data_files=None, shuffle_seed=42, **kwargs):
        super().__init__(**kwargs)
        assert subset in ("ARC-Easy", "ARC-Challenge"), f"ARC subset must be ARC-Easy or ARC-Challenge, got {subset!r}"
        assert split in ("train", "validation", "test"), f"ARC split must be train, validation or test, got {split!r}"
        self.subset, self.split = subset, split
        self.rows = shuffled(load_rows("allenai/ai2_arc", subset, split, data_files=data_files), shuffle_seed)  # upstream's order

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        texts, labels = list(row["choices"]["text"]), [str(l) for l in row["choices"]["label"]]
        key = str(row["answerKey"])
        if key not in labels:
            raise ValueError(f"ARC row {index}: answerKey {key!r} is not one of the labels {labels}")
        return mc_conversation(row["question"], texts, labels.index(key), id=row.get("id"))

    def evaluate(self, conversation, assistant_response):
        return evaluate_mc(conversation, assistant_response)

"""
SmolTalk (HuggingFaceTB/smol-smoltalk): general chat conversations for SFT. Splits "train"
(~460K conversations) and "test" (~24K). Each row is {"messages": [{"role", "content"}, ...]},
optionally starting with a system message (the tokenizer merges it into the first user turn).
"""

from tasks.common import Task, load_rows, shuffled


class SmolTalk(Task):
    eval_type = "generative"

    def __init__(self, split="train", data_files=None, shuffle_seed=42, **kwargs):
        super().__init__(**kwargs)
        assert split in ("train", "test"), f"SmolTalk split must be train or test, got {split!r}"
        self.rows = shuffled(load_rows("HuggingFaceTB/smol-smoltalk", "default", split, data_files=data_files), shuffle_seed)  # upstream's order

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        messages = [{"role": m["role"], "content": m["content"]} for m in self.rows[index]["messages"]]
        body = messages[1:] if messages and messages[0]["role"] == "system" else messages
        # the data is known-good, but a broken row should fail here with its index, not deep in the tokenizer
        if len(body) < 2 or any(m["role"] != ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(body)):
            raise ValueError(f"SmolTalk row {index}: roles must alternate user/assistant, got {[m['role'] for m in messages]}")
        return {"messages": messages}

    def evaluate(self, conversation, assistant_response):
        raise NotImplementedError("SmolTalk is a training set; it has no automatic metric")

"""
MegaContext: a learned long-context memory around the base GPT (design: shared/spec/megacontext.md).

One module per component, read in this order:
- positions.py        Gaussian RoPE: rotary angles from arbitrary positions, damped by each slot's LOD
- gistnet.py          GistNet: a block of 32 embeddings -> one gist in the token-embedding space
- tree.py             MegaContextTree: the whole history, LOD0 tokens + LOD1/LOD2/... gists, RAM or disk
- working_context.py  WorkingContext: the fixed-budget mix of blocks and gists the model attends to, over
                      one memory or several (each entry names its memory), its edits, assembly,
                      fit_budget, the session's share (ck_cap) and the one invariant checker
- lensnet.py          LensNet: signed focus scores for the working-context entries
- horizon.py          scoring WCs by the NLL of the tokens that follow them (one padded forward), where a
                      packed row's horizon starts (split_point), the gist loss, LensNet's scores of WC entries
- allocator.py        FocusAllocator: scores -> legal expand / collapse edits within the budget, over every
                      memory of the WC; refocus (LensNet scores, then allocator steps, until nothing changes)
- slate.py            the slate's pieces: variant budgets, baselines, references, random mixes, perturbations,
                      edit values, the probes it logs (one memory or a --cognitive-core row's two)
- training.py         base_train --megacontext: MegaContextTrainer, the slate of WC variants and the horizon, gist, lens losses
- evaluation.py       validation of the MC path: gap closed, gist substitution, LensNet audit; the documents
                      mc_eval measures and its default run (run_history)
- retrieval.py        exact recall of a fact far back (mc_eval --task passkey/kv-recall/needle) and the
                      Core-Knowledge task (--task ck)
- megaprediction.py   MegaPredictor: readouts of the model's hidden state predict the next block's gist
                      (base_train --megaprediction; gist-first decoding in runtime.py)
- composite.py        composite memories (cognitive core): Core-Knowledge MCs and the session in one WC:
                      their source, building a CK, the starting WC, per-memory attribution
- slots.py            the slot layout of a chat session's WC (memories, entries, the plan slot) and its KV cache
- session_file.py     session.json: a chat session saved beside its disk tree, and opened again
- runtime.py          Session: a chat over an unbounded history at constant cost per token (streaming ingest,
                      refocus every block, the KV cache over the WC, gist-first plans, save / open)
- checkpoint.py       GistNet + LensNet (+ MegaPredictor) beside a base checkpoint (mc_<step>.pt), built in one place
- config.py           MegaContextConfig: the --mc-* flags and mc_* preset keys
Dtypes, at each boundary (tested: tests/test_runtime.py bf16 session, test_positions, test_tree):
- tree storage: gists as fp16 (or bf16) bits, token ids uint32; read back as fp32 (tree.gists)
- GistNet, LensNet, MegaPredictor: fp32 weights. At inference (tree, runtime) all three compute in fp32
  (inputs cast); in training LensNet does too, while GistNet and MegaPredictor run on the model's
  activations in their dtype: with bf16 embeddings a training gist differs from the tree's by bf16
  rounding (test_horizon), below the bf16 slot embeddings the model reads either way
- positions: float64 slot positions -> fp32 rotary angles, then cos / sin in the model's dtype
- the model: fp32 master weights cast to the activation dtype (compute_dtype: bf16 on Ampere+ GPUs,
  fp32 on CPUs); slot embeddings and the KV cache in that dtype; logits fp32
Imports run one way (tests/test_imports.py fails on any cycle): the vanilla model never
imports this package, and `GPT.forward(inputs_embeds=..., rotary=positions.slot_rotary(...), lod=...)`
is the one hook into the base model; runtime, composite and checkpoint reach neither training nor
evaluation.
"""

BLOCK_SIZE = 32  # K: tokens per LOD1 gist, and children per node at every level

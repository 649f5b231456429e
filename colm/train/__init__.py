"""Learning the deferral head.

  1. ``extract``: teacher-forced features for every target token — the base's final hidden state and its
     confidence there (``colm.head.confidence_features``), log P(gold) under base and expert, and both argmaxes —
     computed batched and cached as safetensors shards.
  2. ``weak_labels``: Z = 1 where the expert's argmax is the gold token and the base's is not (paper, Sec. 3.2).
  3. ``fit``: either objective, with a held-out split and early stopping:
       marginal      -log[(1 - σ(d)) P_base(x) + σ(d) P_expert(x)]        (the paper's latent-variable objective)
       disagreement  BCE(σ(d), [argmax P_base != x])  on the expert's own greedy answers (on-policy labels)
     ``gold-disagreement`` is the free variant: the same labels on the gold solution, base vs expert argmax.
     Along the base's or Co-LLM's own answers (a second round: the states its policy visits) the label is the same
     base-vs-expert argmax rule.

The base stays frozen here (CPU default); ``joint_train`` trains LoRA adapters on the base with the head (GPU).

The package, one file per seam: ``features`` (teacher forcing and the shard cache), ``labels``, ``objectives`` (losses
and metrics), ``fitting`` (``TrainConfig`` and ``fit``), ``joint`` (``joint_train``) and ``command`` (``colm train``).
Everything public is re-exported here, so ``from colm.train import fit`` keeps working.
"""
from .command import add_arguments, main
from .features import (FEATURE_KEYS, extract, features_for_batch, gold_logprobs, load_features, right_pad,
                       select_examples, sequences, target_index)
from .fitting import TrainConfig, fit, head_inputs, split_by_example
from .joint import joint_train
from .labels import disagreement_labels, rollout_model, weak_labels
from .objectives import auc, marginal_nll, recall_at, weighted_bce

__all__ = ["FEATURE_KEYS", "TrainConfig", "add_arguments", "auc", "disagreement_labels", "extract",
           "features_for_batch", "fit", "gold_logprobs", "head_inputs", "joint_train", "load_features", "main",
           "marginal_nll", "recall_at", "right_pad", "rollout_model", "select_examples", "sequences", "split_by_example",
           "target_index", "weak_labels", "weighted_bce"]

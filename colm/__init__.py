"""colm: Co-LLM decoding — a base model that learns, token by token, when to hand over to an expert."""
from .decode import CoLLM, Policy, Step, Trace
from .head import DeferralHead, load_head
from .models import ColmError, Pair, load_pair

__all__ = ["CoLLM", "Policy", "Step", "Trace", "DeferralHead", "load_head", "ColmError", "Pair", "load_pair"]

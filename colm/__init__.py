"""colm: Co-LLM decoding — a base model that learns, token by token, when to hand over to an expert."""
from .decode import CoLLM
from .engines import Pair, load_pair
from .head import DeferralHead, load_head
from .models import ColmError
from .policy import Policy
from .trace import Step, Trace

__all__ = ["CoLLM", "Policy", "Step", "Trace", "DeferralHead", "load_head", "ColmError", "Pair", "load_pair"]

from .involution import Involution

__all__ = ["Involution"]

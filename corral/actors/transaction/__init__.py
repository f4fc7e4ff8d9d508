from corral.actors.transaction._manager import TransactionManager, TransactionOptions

__all__ = ["TransactionManager", "TransactionOptions"]

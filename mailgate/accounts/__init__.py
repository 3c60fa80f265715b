"""Account stores: where SMTP logins are checked and Accounts come from.

``file`` (:class:`FileAccountStore`, a TOML file holding only hashes),
``passthrough`` (:class:`PassthroughStore`, the login is the provider's API
credential) and, for tests and embedding, :class:`MemoryAccountStore`.  All
implement :class:`mailgate.interfaces.IAccountStore`.
"""

from mailgate.accounts.account import Account
from mailgate.accounts.filestore import FileAccountStore
from mailgate.accounts.memory import MemoryAccountStore
from mailgate.accounts.passthrough import PassthroughStore

__all__ = ["Account", "FileAccountStore", "MemoryAccountStore", "PassthroughStore"]

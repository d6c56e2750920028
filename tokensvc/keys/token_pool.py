"""Sessions on one PKCS#11 token, used from a bounded pool of threads.

PKCS#11 calls block (a network HSM's is a round trip), so none runs on the event loop:
:meth:`TokenPool.run` hands a function of a session to one of ``sessions`` threads, each
call on a session of its own, and waits at most ``timeout`` seconds for a free slot and
for the answer. More callers than slots wait (bounded by the timeout), so the number of
operations in flight on the token is what the operator configured.

python-pkcs11 calls ``C_Initialize(NULL)``, which by the standard promises the module
that it is never called from two threads at once (SoftHSM then switches its locks off and
crashes under concurrent calls). :class:`_Module` therefore initialises the module itself
with ``CKF_OS_LOCKING_OK`` (the module locks with the OS's primitives) before
python-pkcs11 uses it; if that is not possible, every call is serialised instead.

Failures: any PKCS#11 error other than "no such object" marks the pool broken with a
reason (:meth:`TokenPool.problem`); the next call re-initialises the module and logs in
again (a token that was removed and came back, a restarted HSM). A PIN the token refused is
not tried again until the PIN file changes: an HSM locks its user after a few wrong PINs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pkcs11 import _pkcs11
from pkcs11 import exceptions as p11e

from tokensvc.keys.backend import SigningUnavailable

log = logging.getLogger("tokensvc.keyring")
T = TypeVar("T")
_CKF_OS_LOCKING_OK = 0x2
_RETRY_INTERVAL = 1.0  # seconds between reconnection attempts


class _InitArgs(ctypes.Structure):
    _fields_ = [
        ("create_mutex", ctypes.c_void_p),
        ("destroy_mutex", ctypes.c_void_p),
        ("lock_mutex", ctypes.c_void_p),
        ("unlock_mutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("reserved", ctypes.c_void_p),
    ]


_Fn = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_void_p)


class _FunctionList(ctypes.Structure):  # its head: version, C_Initialize, C_Finalize
    _fields_ = [
        ("major", ctypes.c_ubyte),
        ("minor", ctypes.c_ubyte),
        ("initialize", _Fn),
        ("finalize", _Fn),
    ]


class _Module:
    """One loaded PKCS#11 module (one per path per process: C_Initialize is per process).

    Every call into it holds :meth:`use`; :meth:`reinitialize` (C_Finalize, C_Initialize:
    how a module forgets a token that went away) waits until no call is in flight.
    """

    _loaded: ClassVar[dict[str, _Module]] = {}
    _loaded_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, path: str) -> None:
        self.path = path
        self.generation = 0
        self._functions = _function_list(path)
        self._gate = threading.Condition()
        self._users = 0
        self._closing = False
        module = self

        class _Lib(_pkcs11.lib):
            def initialize(self) -> None:  # python-pkcs11 calls it from its constructor
                module._initialize()

        self._locking = False
        self.lib: Any = _Lib(path)
        # without our locking initialisation, calls must not overlap
        self._serial: Any = contextlib.nullcontext() if self._locking else threading.Lock()
        if not self._locking:
            log.warning("PKCS#11 module %s initialised without locking: calls serialised", path)

    @classmethod
    def get(cls, path: str) -> _Module:
        with cls._loaded_lock:
            if path not in cls._loaded:
                cls._loaded[path] = cls(path)
            return cls._loaded[path]

    def _initialize(self) -> None:
        if self._functions is None:
            raise p11e.PKCS11Error("module has no C_GetFunctionList")
        args = _InitArgs(flags=_CKF_OS_LOCKING_OK)
        rv = self._functions.contents.initialize(ctypes.cast(ctypes.pointer(args), ctypes.c_void_p))
        if rv not in (0, 0x191):  # CKR_OK, CKR_CRYPTOKI_ALREADY_INITIALIZED
            raise p11e.PKCS11Error(f"C_Initialize returned 0x{rv:x}")
        self._locking = True

    @contextlib.contextmanager
    def use(self) -> Iterator[None]:
        with self._gate:
            self._gate.wait_for(lambda: not self._closing)
            self._users += 1
        try:
            with self._serial:
                yield
        finally:
            with self._gate:
                self._users -= 1
                self._gate.notify_all()

    def reinitialize(self, seen: int) -> None:
        """Forget every session and rescan the tokens, unless another pool already did
        since generation ``seen``."""
        with self._gate:
            if self.generation != seen:
                return
            self._closing = True
            self._gate.wait_for(lambda: self._users == 0)
            try:
                if self._locking and self._functions is not None:
                    self._functions.contents.finalize(None)
                    self._initialize()
                else:
                    self.lib.reinitialize()
            finally:
                self.generation += 1
                self._closing = False
                self._gate.notify_all()


def _function_list(path: str) -> Any:
    try:
        dll = ctypes.CDLL(path)
        functions = ctypes.POINTER(_FunctionList)()
        if dll.C_GetFunctionList(ctypes.byref(functions)) != 0:
            return None
        return functions
    except (OSError, AttributeError):
        return None


class TokenPool:
    """Sessions on one token for ``sessions`` threads (see the module doc).

    Args:
        module: path of the PKCS#11 module (.so).
        token_label: the token's label (or None with ``slot``).
        slot: the slot id (or None with ``token_label``).
        pin_file: a file holding the user PIN (read at each login, never logged).
        sessions: operations in flight at most (threads and sessions).
        timeout: seconds to wait for a free slot, and for the token's answer.
    """

    def __init__(
        self,
        module: Path,
        token_label: str | None,
        slot: int | None,
        pin_file: Path,
        sessions: int,
        timeout: float,
    ) -> None:
        self.module_path = str(module)
        self.token_label = token_label
        self.slot = slot
        self.pin_file = pin_file
        self.size = sessions
        self.timeout = timeout
        self.name = f"token={token_label}" if token_label is not None else f"slot={slot}"
        self._module: _Module | None = None
        self._executor = ThreadPoolExecutor(sessions, thread_name_prefix="pkcs11")
        self._slots: asyncio.Semaphore | None = None
        self._lock = threading.Lock()
        self._idle: list[Any] = []
        self._anchor: Any = None  # the logged-in session kept open (login is per process)
        self._generation = -1
        self._token: Any = None
        self._problem: str | None = None
        self._retry_at = 0.0
        self._refused_pin: bytes | None = None
        self._was_up = False  # start-up failures are the caller's one line, not a log

    def problem(self) -> str | None:
        return self._problem

    @property
    def generation(self) -> int:
        """Counts re-initialisations of the module (sessions of an older one are gone)."""
        return self._generation

    async def run(self, fn: Callable[[Any], T]) -> T:
        """``fn(session)`` on a pool thread, bounded and timed out (see the module doc).

        Raises:
            SigningUnavailable: no slot or no answer in time, or the token refused.
            pkcs11.exceptions.NoSuchKey: ``fn`` found no such object (the token is fine).
        """
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.size)
        slots = self._slots
        try:
            await asyncio.wait_for(slots.acquire(), self.timeout)
        except TimeoutError:
            raise SigningUnavailable(
                f"PKCS#11 {self.name}: all {self.size} sessions busy for {self.timeout:g} s"
            ) from None
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn)
        future.add_done_callback(lambda _: slots.release())  # when the thread is free again
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except TimeoutError:
            self._problem = f"PKCS#11 {self.name}: no answer within {self.timeout:g} s"
            raise SigningUnavailable(self._problem) from None

    def invalidate(self, reason: str) -> None:
        """Mark the pool broken from outside (an object that must be there is not: the
        token may have been replaced): the next call re-initialises and logs in again."""
        with self._lock:
            self._fail(p11e.NoSuchKey(reason))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- on the pool's threads -----------------------------------------------------------

    def _call(self, fn: Callable[[Any], T]) -> T:
        session, generation = self._checkout()
        assert self._module is not None
        try:
            with self._module.use():
                if self._module.generation != generation:
                    raise p11e.SessionHandleInvalid("module re-initialised")
                result = fn(session)
        except p11e.NoSuchKey:
            self._checkin(session, generation)
            raise
        except p11e.PKCS11Error as err:
            self._broken(generation, err)
            raise SigningUnavailable(self._problem or str(err)) from None
        self._checkin(session, generation)
        return result

    def _checkout(self) -> tuple[Any, int]:
        with self._lock:
            module = self._module
            if module is None or self._generation != module.generation or self._problem:
                self._connect()
                module = self._module
            assert module is not None
            if self._idle:
                return self._idle.pop(), self._generation
            try:
                # read/write like the anchor: any session may be handed a rotation's
                # generate or a destroy, which a read-only one refuses (CKR_SESSION_READ_ONLY,
                # taken for a token failure) -- met as soon as signing load opens a second
                with module.use():
                    return self._token.open(rw=True), self._generation
            except p11e.PKCS11Error as err:
                self._fail(err)
                raise SigningUnavailable(self._problem or str(err)) from None

    def _checkin(self, session: Any, generation: int) -> None:
        with self._lock:
            if generation == self._generation and not self._problem:
                self._idle.append(session)

    def _broken(self, generation: int, err: Exception) -> None:
        with self._lock:
            if generation == self._generation:
                self._fail(err)

    def _fail(self, err: Exception) -> None:
        """Mark the pool broken (lock held): sessions dropped, reconnect on next use.
        Logged once per outage (start-up failures are the caller's one line)."""
        first = self._problem is None
        self._problem = f"PKCS#11 {self.name} unavailable: {describe(err)}"
        self._idle.clear()
        self._anchor = None
        if self._was_up and first:
            log.warning("%s", self._problem)

    def _connect(self) -> None:
        """(Re)initialise the module if needed, find the token, log in (lock held)."""
        now = time.monotonic()
        if self._problem and now < self._retry_at:
            raise SigningUnavailable(self._problem)
        self._retry_at = now + _RETRY_INTERVAL
        try:
            if self._module is None:
                self._module = _Module.get(self.module_path)
            elif self._problem or self._generation != self._module.generation:
                self._module.reinitialize(self._generation)
            module = self._module
            self._generation = module.generation
            with module.use():
                self._login(module)
        except SigningUnavailable as err:
            self._problem = str(err)
            raise
        except p11e.PKCS11Error as err:
            self._fail(err)
            raise SigningUnavailable(self._problem or str(err)) from None
        if self._problem and self._was_up:
            log.info("PKCS#11 %s is available again", self.name)
        self._problem = None
        self._was_up = True

    def _login(self, module: _Module) -> None:
        if self.token_label is not None:
            self._token = module.lib.get_token(token_label=self.token_label)
        else:
            slots = [s for s in module.lib.get_slots(token_present=True) if s.slot_id == self.slot]
            if not slots:
                raise p11e.NoSuchToken(f"no token in slot {self.slot}")
            self._token = slots[0].get_token()
        pin = read_pin(self.pin_file)
        if pin == self._refused_pin:
            raise SigningUnavailable(
                f"PKCS#11 {self.name}: the token refused the PIN of {self.pin_file}; not "
                "tried again until that file changes"
            )
        try:
            user_pin = pin.decode("utf-8")
        except UnicodeDecodeError:  # an operator's mistake: one line, never a traceback
            raise SigningUnavailable(
                f"PKCS#11 {self.name}: the PIN file {self.pin_file} is not UTF-8 text"
            ) from None
        self._idle.clear()
        try:
            self._anchor = self._token.open(rw=True, user_pin=user_pin)
        except p11e.UserAlreadyLoggedIn:  # another pool of this process logged in
            self._anchor = self._token.open(rw=True)
        except (p11e.PinIncorrect, p11e.PinInvalid, p11e.PinLenRange, p11e.PinLocked) as err:
            self._refused_pin = pin
            raise SigningUnavailable(
                f"PKCS#11 {self.name}: the token refused the PIN of {self.pin_file} "
                f"({describe(err)})"
            ) from None
        self._refused_pin = None
        self._idle.append(self._anchor)


def read_pin(path: Path) -> bytes:
    """The user PIN from ``path`` (one line; trailing newline dropped). Like the KEK file,
    it should be readable by the service's user alone: a warning says so otherwise.

    Raises:
        SigningUnavailable: the file cannot be read.
    """
    try:
        mode = path.stat().st_mode
        if mode & 0o077:
            log.warning(
                "PKCS#11 PIN file %s is readable by group or others (mode %o): chmod 600 it",
                path,
                mode & 0o777,
            )
        return path.read_bytes().rstrip(b"\r\n")
    except OSError as err:
        raise SigningUnavailable(f"cannot read the PKCS#11 PIN file {path}: {err}") from None


def describe(err: Exception) -> str:
    """A PKCS#11 error as words: its class name (python-pkcs11 raises most without text),
    and its message if it has one."""
    name = type(err).__name__
    text = str(err)
    return f"{name}: {text}" if text else name


__all__ = ["TokenPool", "describe", "read_pin"]

"""A token with little room: a tests-only PKCS#11 module in front of SoftHSM2 (never part of the product).

SoftHSM2 has no notion of a full token, and a genuinely full token store (a tiny filesystem under its
token folder: possible only in a user+mount namespace) makes it answer CKR_FUNCTION_FAILED, not the
CKR_DEVICE_MEMORY an HSM or a secure element answers when it has no room left. So the fault is made at
the PKCS#11 boundary: `build_small_token_module` compiles a module that hands every call to the real
library unchanged, except the calls that make or remove token objects, which it counts against the room
left in a file (P11ROOM_FILE, a number of objects): C_CreateObject and C_CopyObject take one,
C_GenerateKeyPair two, C_DestroyObject gives one back, and a call the room does not cover answers
CKR_DEVICE_MEMORY without reaching the real library. The real module is named by P11ROOM_MODULE. Every
process that loads it (a hub-onboard child) shares the room file, as processes share a token; a test
fills the token by writing 0 there.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

MODULE_ENV = "P11ROOM_MODULE"
ROOM_ENV = "P11ROOM_FILE"

_SOURCE = r"""
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

typedef unsigned long CK_RV;
typedef unsigned long CK_ULONG;
/* CK_FUNCTION_LIST: CK_VERSION, then the 68 functions of PKCS#11 v2.40 in the standard's order. */
struct function_list { unsigned char major, minor; void *f[68]; };
enum { GET_FUNCTION_LIST = 3, CREATE_OBJECT = 20, COPY_OBJECT = 21, DESTROY_OBJECT = 22,
       GENERATE_KEY_PAIR = 59 };
#define CKR_OK 0x0UL
#define CKR_GENERAL_ERROR 0x5UL
#define CKR_DEVICE_MEMORY 0x31UL

static struct function_list *real;
static struct function_list mine;

static long room(void) {
    long n = 0;
    FILE *f = fopen(getenv("P11ROOM_FILE"), "r");
    if (f) { if (fscanf(f, "%ld", &n) != 1) n = 0; fclose(f); }
    return n;
}

static void set_room(long n) {
    FILE *f = fopen(getenv("P11ROOM_FILE"), "w");
    if (f) { fprintf(f, "%ld\n", n); fclose(f); }
}

typedef CK_RV (*create_fn)(CK_ULONG, void *, CK_ULONG, CK_ULONG *);
static CK_RV create_object(CK_ULONG s, void *t, CK_ULONG n, CK_ULONG *h) {
    long left = room();
    if (left < 1) return CKR_DEVICE_MEMORY;
    CK_RV rv = ((create_fn)real->f[CREATE_OBJECT])(s, t, n, h);
    if (rv == CKR_OK) set_room(left - 1);
    return rv;
}

typedef CK_RV (*copy_fn)(CK_ULONG, CK_ULONG, void *, CK_ULONG, CK_ULONG *);
static CK_RV copy_object(CK_ULONG s, CK_ULONG o, void *t, CK_ULONG n, CK_ULONG *h) {
    long left = room();
    if (left < 1) return CKR_DEVICE_MEMORY;
    CK_RV rv = ((copy_fn)real->f[COPY_OBJECT])(s, o, t, n, h);
    if (rv == CKR_OK) set_room(left - 1);
    return rv;
}

typedef CK_RV (*destroy_fn)(CK_ULONG, CK_ULONG);
static CK_RV destroy_object(CK_ULONG s, CK_ULONG o) {
    CK_RV rv = ((destroy_fn)real->f[DESTROY_OBJECT])(s, o);
    if (rv == CKR_OK) set_room(room() + 1);
    return rv;
}

typedef CK_RV (*pair_fn)(CK_ULONG, void *, void *, CK_ULONG, void *, CK_ULONG, CK_ULONG *, CK_ULONG *);
static CK_RV generate_key_pair(CK_ULONG s, void *m, void *pt, CK_ULONG pn, void *kt, CK_ULONG kn,
                               CK_ULONG *pub, CK_ULONG *priv) {
    long left = room();
    if (left < 2) return CKR_DEVICE_MEMORY;
    CK_RV rv = ((pair_fn)real->f[GENERATE_KEY_PAIR])(s, m, pt, pn, kt, kn, pub, priv);
    if (rv == CKR_OK) set_room(left - 2);
    return rv;
}

CK_RV C_GetFunctionList(struct function_list **out) {
    if (!real) {
        void *lib = dlopen(getenv("P11ROOM_MODULE"), RTLD_NOW);
        if (!lib) return CKR_GENERAL_ERROR;
        CK_RV (*get)(struct function_list **) = (CK_RV (*)(struct function_list **))dlsym(
            lib, "C_GetFunctionList");
        if (!get || get(&real) != CKR_OK) return CKR_GENERAL_ERROR;
        mine = *real;
        mine.f[GET_FUNCTION_LIST] = (void *)C_GetFunctionList;
        mine.f[CREATE_OBJECT] = (void *)create_object;
        mine.f[COPY_OBJECT] = (void *)copy_object;
        mine.f[DESTROY_OBJECT] = (void *)destroy_object;
        mine.f[GENERATE_KEY_PAIR] = (void *)generate_key_pair;
    }
    *out = &mine;
    return CKR_OK;
}
"""


def build_small_token_module(folder: Path) -> Path:
    """Compile the module into `folder`; its path. `make test` installs a C compiler where missing: a test
    that cannot build the module fails rather than skips (a skipped test would count as a pass)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.fail(
            "a C compiler (cc) is needed to build the tests' small-token PKCS#11 module: run make setup"
        )
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "small_token.c"
    source.write_text(_SOURCE)
    module = folder / "libsmalltoken.so"
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-O1", "-o", str(module), str(source), "-ldl"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return module

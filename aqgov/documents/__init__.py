"""Canonical bytes, keys, signatures and Merkle trees: what every signed artefact is made of."""

from aqgov.documents._canonical import (
    CanonicalError,
    encode,
    decode,
    sha256,
    digest_hex,
)
from aqgov.documents._files import (
    atomic_write,
)
from aqgov.documents._keys import (
    PublicKey,
    SigningKey,
    TrustStore,
    generate,
    key_id,
    load_public_key,
    load_signing_key,
    public_key_json,
    write_keypair,
)
from aqgov.documents._merkle import (
    CompactRange,
    MerkleTree,
    leaf_hash,
    node_hash,
    root,
    verify_consistency,
    verify_inclusion,
)
from aqgov.documents._signing import (
    Signature,
    SignedDocument,
    pae,
    sign,
    verify,
)

__all__ = [
    "atomic_write",
    "CanonicalError",
    "CompactRange",
    "decode",
    "digest_hex",
    "encode",
    "generate",
    "key_id",
    "leaf_hash",
    "load_public_key",
    "load_signing_key",
    "MerkleTree",
    "node_hash",
    "pae",
    "public_key_json",
    "PublicKey",
    "root",
    "sha256",
    "sign",
    "Signature",
    "SignedDocument",
    "SigningKey",
    "TrustStore",
    "verify",
    "verify_consistency",
    "verify_inclusion",
    "write_keypair",
]

"""An outside verifier for Outboard attestation documents, written only against the AWS Nitro
Enclaves document specification, with cbor2, pycose and cryptography (none of our code).

usage: verify_nitro.py DOC ROOT_PEM NONCE_HEX
Exits 0 and prints OK when the document verifies; raises otherwise.
"""
import datetime
import sys

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification as xv
from pycose.keys import EC2Key
from pycose.keys.curves import P384
from pycose.messages import Sign1Message

doc = open(sys.argv[1], "rb").read()
root = x509.load_pem_x509_certificate(open(sys.argv[2], "rb").read())
nonce = bytes.fromhex(sys.argv[3])

# COSE_Sign1, untagged, as Nitro emits it.
outer = cbor2.loads(doc)
assert isinstance(outer, list) and len(outer) == 4, "not an untagged COSE_Sign1 array"
assert outer[0] == bytes.fromhex("a1013822"), "protected header is not {1: -35}"
assert outer[1] == {}, "unprotected header is not empty"
assert len(outer[3]) == 96, "ES384 signature is not raw r||s"

payload = cbor2.loads(outer[2])
assert list(payload) == [
    "module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle",
    "public_key", "user_data", "nonce",
], list(payload)
assert payload["digest"] == "SHA384"
assert isinstance(payload["module_id"], str) and payload["module_id"]
assert isinstance(payload["timestamp"], int) and payload["timestamp"] > 0
assert all(isinstance(i, int) and 0 <= i < 32 and len(v) == 48 for i, v in payload["pcrs"].items())
assert payload["nonce"] == nonce, "nonce mismatch"

# Signature: pycose builds the message from the decoded array (as AWS's Python sample does).
leaf = x509.load_der_x509_certificate(payload["certificate"])
pub = leaf.public_key()
assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp384r1"
nums = pub.public_numbers()
msg = Sign1Message.from_cose_obj(list(outer), True)
msg.key = EC2Key(crv=P384, x=nums.x.to_bytes(48, "big"), y=nums.y.to_bytes(48, "big"))
assert msg.verify_signature(), "COSE signature does not verify"

# Chain: leaf <- cabundle[-1] <- ... <- cabundle[1] <- the root we were given (cabundle[0] is
# the document's copy of the root; it is not trusted).
bundle = [x509.load_der_x509_certificate(c) for c in payload["cabundle"]]
now = datetime.datetime.now(datetime.timezone.utc)
chain = [root] + bundle[1:] + [leaf]
for parent, child in zip(chain, chain[1:]):
    child.verify_directly_issued_by(parent)
    bc = parent.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca, "issuer is not a CA"
for cert in chain:
    assert cert.not_valid_before_utc <= now <= cert.not_valid_after_utc, "certificate not valid now"

# And cryptography's RFC 5280 path builder, with the root as the only trust anchor.
verifier = (
    xv.PolicyBuilder()
    .store(xv.Store([root]))
    .time(now)
    .extension_policies(
        ca_policy=xv.ExtensionPolicy.webpki_defaults_ca(),
        ee_policy=xv.ExtensionPolicy.permit_all(),
    )
    .build_client_verifier()
)
verifier.verify(leaf, bundle[1:])
print("OK")

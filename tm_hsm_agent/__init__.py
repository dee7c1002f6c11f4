"""tm-hsm-agent: mint True Markets API tokens with a P-256 key that never leaves a PKCS#11 token.

Layers, data flowing one way (nothing imports a layer above it):

    token (PKCS#11) -> signer (ES256 r||s) -> auth (API client) -> cache -> server / cli
"""

__version__ = "0.1.0"

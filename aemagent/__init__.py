"""aemagent: the ssh-agent of AEM.

A background daemon that holds Adobe IMS credentials in memory, exchanges them for access tokens,
refreshes the tokens well ahead of expiry and serves them over a Unix socket.

This module imports nothing: `aem-token` imports the package on its hot path.
"""

__version__ = "0.1.0"

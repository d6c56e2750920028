"""The error of an unusable setting, in a module of its own: every module that checks part
of the configuration (config, redisconn, tls, policy, http_jwks) raises it without having
to import the others (tokensvc.config uses redisconn to check --redis-url)."""


class ConfigError(ValueError):
    """An invalid configuration value; the message names the setting."""

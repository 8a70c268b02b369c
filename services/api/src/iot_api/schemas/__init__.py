"""Request and response bodies of the API, one module per resource, as msgspec Structs: they validate and
they are the OpenAPI document. Field types shared with other services (device ids, alert rules and their
actions) come from ``iot_common``, so that every service reads the same limits."""

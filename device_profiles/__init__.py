"""Device profiles: the DeviceProfile contract, the shipped profiles, byte sizes.

``load_profile("iphone-15-pro")`` or ``load_profile("my.json")``; ``list_profiles()`` names the shipped ones.
"""

from .profile import (
    Calibration,
    ComputeUnit,
    Contention,
    DeviceProfile,
    LoadingSpec,
    MemorySpec,
    Unit,
    WeightDType,
)
from .registry import (
    ProfileError,
    list_profiles,
    load_profile,
    parse_profile,
    profile_path,
    profile_schema,
    save_profile,
    write_profile_schema,
)
from .units import format_size, parse_size

__all__ = [
    "Calibration", "ComputeUnit", "Contention", "DeviceProfile", "LoadingSpec", "MemorySpec", "ProfileError",
    "Unit", "WeightDType", "format_size", "list_profiles", "load_profile", "parse_profile", "parse_size",
    "profile_path", "profile_schema", "save_profile", "write_profile_schema",
]

from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Pool(_message.Message):
    __slots__ = ("name", "vg", "thin_pool", "extent_bytes", "physical_total_bytes", "physical_used_bytes", "overprovision_ratio", "available_bytes", "data_percent", "metadata_percent", "max_fill_percent", "warn_fill_percent", "volume_count", "wiping_volumes", "wiping_bytes", "wipe_error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VG_FIELD_NUMBER: _ClassVar[int]
    THIN_POOL_FIELD_NUMBER: _ClassVar[int]
    EXTENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    PHYSICAL_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    PHYSICAL_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    OVERPROVISION_RATIO_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_PERCENT_FIELD_NUMBER: _ClassVar[int]
    METADATA_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MAX_FILL_PERCENT_FIELD_NUMBER: _ClassVar[int]
    WARN_FILL_PERCENT_FIELD_NUMBER: _ClassVar[int]
    VOLUME_COUNT_FIELD_NUMBER: _ClassVar[int]
    WIPING_VOLUMES_FIELD_NUMBER: _ClassVar[int]
    WIPING_BYTES_FIELD_NUMBER: _ClassVar[int]
    WIPE_ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    vg: str
    thin_pool: str
    extent_bytes: int
    physical_total_bytes: int
    physical_used_bytes: int
    overprovision_ratio: float
    available_bytes: int
    data_percent: float
    metadata_percent: float
    max_fill_percent: float
    warn_fill_percent: float
    volume_count: int
    wiping_volumes: int
    wiping_bytes: int
    wipe_error: str
    def __init__(self, name: _Optional[str] = ..., vg: _Optional[str] = ..., thin_pool: _Optional[str] = ..., extent_bytes: _Optional[int] = ..., physical_total_bytes: _Optional[int] = ..., physical_used_bytes: _Optional[int] = ..., overprovision_ratio: _Optional[float] = ..., available_bytes: _Optional[int] = ..., data_percent: _Optional[float] = ..., metadata_percent: _Optional[float] = ..., max_fill_percent: _Optional[float] = ..., warn_fill_percent: _Optional[float] = ..., volume_count: _Optional[int] = ..., wiping_volumes: _Optional[int] = ..., wiping_bytes: _Optional[int] = ..., wipe_error: _Optional[str] = ...) -> None: ...

class AgentInfo(_message.Message):
    __slots__ = ("node_name", "api_version", "agent_version", "pools", "portals", "ready", "not_ready_reason", "features")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    PORTALS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    NOT_READY_REASON_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    api_version: str
    agent_version: str
    pools: _containers.RepeatedCompositeFieldContainer[Pool]
    portals: _containers.RepeatedScalarFieldContainer[str]
    ready: bool
    not_ready_reason: str
    features: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_name: _Optional[str] = ..., api_version: _Optional[str] = ..., agent_version: _Optional[str] = ..., pools: _Optional[_Iterable[_Union[Pool, _Mapping]]] = ..., portals: _Optional[_Iterable[str]] = ..., ready: _Optional[bool] = ..., not_ready_reason: _Optional[str] = ..., features: _Optional[_Iterable[str]] = ...) -> None: ...

class VolumeSource(_message.Message):
    __slots__ = ("node", "address", "vg", "lv", "snapshot", "size_bytes", "offset_bytes")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    VG_FIELD_NUMBER: _ClassVar[int]
    LV_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    node: str
    address: str
    vg: str
    lv: str
    snapshot: bool
    size_bytes: int
    offset_bytes: int
    def __init__(self, node: _Optional[str] = ..., address: _Optional[str] = ..., vg: _Optional[str] = ..., lv: _Optional[str] = ..., snapshot: _Optional[bool] = ..., size_bytes: _Optional[int] = ..., offset_bytes: _Optional[int] = ...) -> None: ...

class CreateVolumeRequest(_message.Message):
    __slots__ = ("name", "pool", "size_bytes", "attributes", "source")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    pool: str
    size_bytes: int
    attributes: _containers.ScalarMap[str, str]
    source: VolumeSource
    def __init__(self, name: _Optional[str] = ..., pool: _Optional[str] = ..., size_bytes: _Optional[int] = ..., attributes: _Optional[_Mapping[str, str]] = ..., source: _Optional[_Union[VolumeSource, _Mapping]] = ...) -> None: ...

class Initiator(_message.Message):
    __slots__ = ("iqn", "read_only", "node")
    IQN_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    iqn: str
    read_only: bool
    node: str
    def __init__(self, iqn: _Optional[str] = ..., read_only: _Optional[bool] = ..., node: _Optional[str] = ...) -> None: ...

class Volume(_message.Message):
    __slots__ = ("name", "pool", "vg", "lv", "size_bytes", "attributes", "target_iqn", "initiators", "exported", "created_unix", "healthy", "condition", "ready", "copy_running", "condition_reason")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    VG_FIELD_NUMBER: _ClassVar[int]
    LV_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    TARGET_IQN_FIELD_NUMBER: _ClassVar[int]
    INITIATORS_FIELD_NUMBER: _ClassVar[int]
    EXPORTED_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    COPY_RUNNING_FIELD_NUMBER: _ClassVar[int]
    CONDITION_REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    pool: str
    vg: str
    lv: str
    size_bytes: int
    attributes: _containers.ScalarMap[str, str]
    target_iqn: str
    initiators: _containers.RepeatedCompositeFieldContainer[Initiator]
    exported: bool
    created_unix: int
    healthy: bool
    condition: str
    ready: bool
    copy_running: bool
    condition_reason: str
    def __init__(self, name: _Optional[str] = ..., pool: _Optional[str] = ..., vg: _Optional[str] = ..., lv: _Optional[str] = ..., size_bytes: _Optional[int] = ..., attributes: _Optional[_Mapping[str, str]] = ..., target_iqn: _Optional[str] = ..., initiators: _Optional[_Iterable[_Union[Initiator, _Mapping]]] = ..., exported: _Optional[bool] = ..., created_unix: _Optional[int] = ..., healthy: _Optional[bool] = ..., condition: _Optional[str] = ..., ready: _Optional[bool] = ..., copy_running: _Optional[bool] = ..., condition_reason: _Optional[str] = ...) -> None: ...

class DeleteVolumeRequest(_message.Message):
    __slots__ = ("vg", "lv")
    VG_FIELD_NUMBER: _ClassVar[int]
    LV_FIELD_NUMBER: _ClassVar[int]
    vg: str
    lv: str
    def __init__(self, vg: _Optional[str] = ..., lv: _Optional[str] = ...) -> None: ...

class DeleteVolumeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetVolumeRequest(_message.Message):
    __slots__ = ("vg", "lv", "name", "brief")
    VG_FIELD_NUMBER: _ClassVar[int]
    LV_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    BRIEF_FIELD_NUMBER: _ClassVar[int]
    vg: str
    lv: str
    name: str
    brief: bool
    def __init__(self, vg: _Optional[str] = ..., lv: _Optional[str] = ..., name: _Optional[str] = ..., brief: _Optional[bool] = ...) -> None: ...

class ListVolumesRequest(_message.Message):
    __slots__ = ("max_entries", "starting_token")
    MAX_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    STARTING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    max_entries: int
    starting_token: str
    def __init__(self, max_entries: _Optional[int] = ..., starting_token: _Optional[str] = ...) -> None: ...

class ListVolumesResponse(_message.Message):
    __slots__ = ("volumes", "next_token")
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    volumes: _containers.RepeatedCompositeFieldContainer[Volume]
    next_token: str
    def __init__(self, volumes: _Optional[_Iterable[_Union[Volume, _Mapping]]] = ..., next_token: _Optional[str] = ...) -> None: ...

class ExpandVolumeRequest(_message.Message):
    __slots__ = ("vg", "lv", "size_bytes", "limit_bytes")
    VG_FIELD_NUMBER: _ClassVar[int]
    LV_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    vg: str
    lv: str
    size_bytes: int
    limit_bytes: int
    def __init__(self, vg: _Optional[str] = ..., lv: _Optional[str] = ..., size_bytes: _Optional[int] = ..., limit_bytes: _Optional[int] = ...) -> None: ...

class GrantAccessRequest(_message.Message):
    __slots__ = ("vg", "lv", "initiator_iqn", "read_only", "mutual_chap", "node_name")
    VG_FIELD_NUMBER: _ClassVar[int]
    LV_FIELD_NUMBER: _ClassVar[int]
    INITIATOR_IQN_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    MUTUAL_CHAP_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    vg: str
    lv: str
    initiator_iqn: str
    read_only: bool
    mutual_chap: bool
    node_name: str
    def __init__(self, vg: _Optional[str] = ..., lv: _Optional[str] = ..., initiator_iqn: _Optional[str] = ..., read_only: _Optional[bool] = ..., mutual_chap: _Optional[bool] = ..., node_name: _Optional[str] = ...) -> None: ...

class GrantAccessResponse(_message.Message):
    __slots__ = ("target_iqn", "portals", "lun")
    TARGET_IQN_FIELD_NUMBER: _ClassVar[int]
    PORTALS_FIELD_NUMBER: _ClassVar[int]
    LUN_FIELD_NUMBER: _ClassVar[int]
    target_iqn: str
    portals: _containers.RepeatedScalarFieldContainer[str]
    lun: int
    def __init__(self, target_iqn: _Optional[str] = ..., portals: _Optional[_Iterable[str]] = ..., lun: _Optional[int] = ...) -> None: ...

class GetCredentialsRequest(_message.Message):
    __slots__ = ("vg", "lv", "initiator_iqn")
    VG_FIELD_NUMBER: _ClassVar[int]
    LV_FIELD_NUMBER: _ClassVar[int]
    INITIATOR_IQN_FIELD_NUMBER: _ClassVar[int]
    vg: str
    lv: str
    initiator_iqn: str
    def __init__(self, vg: _Optional[str] = ..., lv: _Optional[str] = ..., initiator_iqn: _Optional[str] = ...) -> None: ...

class Credentials(_message.Message):
    __slots__ = ("chap_user", "chap_secret", "mutual_chap_user", "mutual_chap_secret")
    CHAP_USER_FIELD_NUMBER: _ClassVar[int]
    CHAP_SECRET_FIELD_NUMBER: _ClassVar[int]
    MUTUAL_CHAP_USER_FIELD_NUMBER: _ClassVar[int]
    MUTUAL_CHAP_SECRET_FIELD_NUMBER: _ClassVar[int]
    chap_user: str
    chap_secret: str
    mutual_chap_user: str
    mutual_chap_secret: str
    def __init__(self, chap_user: _Optional[str] = ..., chap_secret: _Optional[str] = ..., mutual_chap_user: _Optional[str] = ..., mutual_chap_secret: _Optional[str] = ...) -> None: ...

class AllowCopyRequest(_message.Message):
    __slots__ = ("vg", "lv", "destination_node", "ttl_seconds")
    VG_FIELD_NUMBER: _ClassVar[int]
    LV_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_NODE_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    vg: str
    lv: str
    destination_node: str
    ttl_seconds: int
    def __init__(self, vg: _Optional[str] = ..., lv: _Optional[str] = ..., destination_node: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class AllowCopyResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RevokeAccessRequest(_message.Message):
    __slots__ = ("vg", "lv", "initiator_iqn")
    VG_FIELD_NUMBER: _ClassVar[int]
    LV_FIELD_NUMBER: _ClassVar[int]
    INITIATOR_IQN_FIELD_NUMBER: _ClassVar[int]
    vg: str
    lv: str
    initiator_iqn: str
    def __init__(self, vg: _Optional[str] = ..., lv: _Optional[str] = ..., initiator_iqn: _Optional[str] = ...) -> None: ...

class RevokeAccessResponse(_message.Message):
    __slots__ = ("sessions_ended",)
    SESSIONS_ENDED_FIELD_NUMBER: _ClassVar[int]
    sessions_ended: int
    def __init__(self, sessions_ended: _Optional[int] = ...) -> None: ...

class Snapshot(_message.Message):
    __slots__ = ("name", "vg", "lv", "source_vg", "source_lv", "size_bytes", "created_unix", "ready", "source_replicated")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VG_FIELD_NUMBER: _ClassVar[int]
    LV_FIELD_NUMBER: _ClassVar[int]
    SOURCE_VG_FIELD_NUMBER: _ClassVar[int]
    SOURCE_LV_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    SOURCE_REPLICATED_FIELD_NUMBER: _ClassVar[int]
    name: str
    vg: str
    lv: str
    source_vg: str
    source_lv: str
    size_bytes: int
    created_unix: int
    ready: bool
    source_replicated: bool
    def __init__(self, name: _Optional[str] = ..., vg: _Optional[str] = ..., lv: _Optional[str] = ..., source_vg: _Optional[str] = ..., source_lv: _Optional[str] = ..., size_bytes: _Optional[int] = ..., created_unix: _Optional[int] = ..., ready: _Optional[bool] = ..., source_replicated: _Optional[bool] = ...) -> None: ...

class CreateSnapshotRequest(_message.Message):
    __slots__ = ("name", "source_vg", "source_lv", "transient")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_VG_FIELD_NUMBER: _ClassVar[int]
    SOURCE_LV_FIELD_NUMBER: _ClassVar[int]
    TRANSIENT_FIELD_NUMBER: _ClassVar[int]
    name: str
    source_vg: str
    source_lv: str
    transient: bool
    def __init__(self, name: _Optional[str] = ..., source_vg: _Optional[str] = ..., source_lv: _Optional[str] = ..., transient: _Optional[bool] = ...) -> None: ...

class DeleteSnapshotRequest(_message.Message):
    __slots__ = ("vg", "lv")
    VG_FIELD_NUMBER: _ClassVar[int]
    LV_FIELD_NUMBER: _ClassVar[int]
    vg: str
    lv: str
    def __init__(self, vg: _Optional[str] = ..., lv: _Optional[str] = ...) -> None: ...

class DeleteSnapshotResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExamineLegRequest(_message.Message):
    __slots__ = ("vg", "lv")
    VG_FIELD_NUMBER: _ClassVar[int]
    LV_FIELD_NUMBER: _ClassVar[int]
    vg: str
    lv: str
    def __init__(self, vg: _Optional[str] = ..., lv: _Optional[str] = ...) -> None: ...

class LegSuperblock(_message.Message):
    __slots__ = ("present", "name", "uuid", "events", "array_state", "recovering")
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    ARRAY_STATE_FIELD_NUMBER: _ClassVar[int]
    RECOVERING_FIELD_NUMBER: _ClassVar[int]
    present: bool
    name: str
    uuid: str
    events: int
    array_state: str
    recovering: bool
    def __init__(self, present: _Optional[bool] = ..., name: _Optional[str] = ..., uuid: _Optional[str] = ..., events: _Optional[int] = ..., array_state: _Optional[str] = ..., recovering: _Optional[bool] = ...) -> None: ...

class LegLocation(_message.Message):
    __slots__ = ("index", "storage_node", "vg", "agent", "target_iqn", "portals", "lun", "replaces", "outdated")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    STORAGE_NODE_FIELD_NUMBER: _ClassVar[int]
    VG_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    TARGET_IQN_FIELD_NUMBER: _ClassVar[int]
    PORTALS_FIELD_NUMBER: _ClassVar[int]
    LUN_FIELD_NUMBER: _ClassVar[int]
    REPLACES_FIELD_NUMBER: _ClassVar[int]
    OUTDATED_FIELD_NUMBER: _ClassVar[int]
    index: int
    storage_node: str
    vg: str
    agent: str
    target_iqn: str
    portals: _containers.RepeatedScalarFieldContainer[str]
    lun: int
    replaces: _containers.RepeatedScalarFieldContainer[str]
    outdated: bool
    def __init__(self, index: _Optional[int] = ..., storage_node: _Optional[str] = ..., vg: _Optional[str] = ..., agent: _Optional[str] = ..., target_iqn: _Optional[str] = ..., portals: _Optional[_Iterable[str]] = ..., lun: _Optional[int] = ..., replaces: _Optional[_Iterable[str]] = ..., outdated: _Optional[bool] = ...) -> None: ...

class SetPeerLegRequest(_message.Message):
    __slots__ = ("vg", "lv", "peer")
    VG_FIELD_NUMBER: _ClassVar[int]
    LV_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    vg: str
    lv: str
    peer: LegLocation
    def __init__(self, vg: _Optional[str] = ..., lv: _Optional[str] = ..., peer: _Optional[_Union[LegLocation, _Mapping]] = ...) -> None: ...

class SetPeerLegResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetPeerLegRequest(_message.Message):
    __slots__ = ("vg", "lv")
    VG_FIELD_NUMBER: _ClassVar[int]
    LV_FIELD_NUMBER: _ClassVar[int]
    vg: str
    lv: str
    def __init__(self, vg: _Optional[str] = ..., lv: _Optional[str] = ...) -> None: ...

class PeerLeg(_message.Message):
    __slots__ = ("present", "peer")
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    present: bool
    peer: LegLocation
    def __init__(self, present: _Optional[bool] = ..., peer: _Optional[_Union[LegLocation, _Mapping]] = ...) -> None: ...

class GetSnapshotRequest(_message.Message):
    __slots__ = ("vg", "lv", "name")
    VG_FIELD_NUMBER: _ClassVar[int]
    LV_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    vg: str
    lv: str
    name: str
    def __init__(self, vg: _Optional[str] = ..., lv: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class ListSnapshotsRequest(_message.Message):
    __slots__ = ("max_entries", "starting_token")
    MAX_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    STARTING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    max_entries: int
    starting_token: str
    def __init__(self, max_entries: _Optional[int] = ..., starting_token: _Optional[str] = ...) -> None: ...

class ListSnapshotsResponse(_message.Message):
    __slots__ = ("snapshots", "next_token")
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    snapshots: _containers.RepeatedCompositeFieldContainer[Snapshot]
    next_token: str
    def __init__(self, snapshots: _Optional[_Iterable[_Union[Snapshot, _Mapping]]] = ..., next_token: _Optional[str] = ...) -> None: ...

class ReadDataRequest(_message.Message):
    __slots__ = ("vg", "lv", "offset_bytes", "size_bytes")
    VG_FIELD_NUMBER: _ClassVar[int]
    LV_FIELD_NUMBER: _ClassVar[int]
    OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    vg: str
    lv: str
    offset_bytes: int
    size_bytes: int
    def __init__(self, vg: _Optional[str] = ..., lv: _Optional[str] = ..., offset_bytes: _Optional[int] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class DataChunk(_message.Message):
    __slots__ = ("offset", "data", "done", "size_bytes", "sha256")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    done: bool
    size_bytes: int
    sha256: str
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., done: _Optional[bool] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class OrphansRequest(_message.Message):
    __slots__ = ("min_age_seconds", "remove")
    MIN_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REMOVE_FIELD_NUMBER: _ClassVar[int]
    min_age_seconds: int
    remove: bool
    def __init__(self, min_age_seconds: _Optional[int] = ..., remove: _Optional[bool] = ...) -> None: ...

class Orphan(_message.Message):
    __slots__ = ("kind", "name", "reason", "age_seconds", "removed")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    reason: str
    age_seconds: int
    removed: bool
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., reason: _Optional[str] = ..., age_seconds: _Optional[int] = ..., removed: _Optional[bool] = ...) -> None: ...

class OrphansResponse(_message.Message):
    __slots__ = ("orphans",)
    ORPHANS_FIELD_NUMBER: _ClassVar[int]
    orphans: _containers.RepeatedCompositeFieldContainer[Orphan]
    def __init__(self, orphans: _Optional[_Iterable[_Union[Orphan, _Mapping]]] = ...) -> None: ...

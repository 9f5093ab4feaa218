{{/* Names, labels, images and the TLS material shared by the templates. */}}

{{- define "lvm-iscsi-csi.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's base name: the release name when it already contains the chart name. */}}
{{- define "lvm-iscsi-csi.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "lvm-iscsi-csi.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lvm-iscsi-csi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "lvm-iscsi-csi.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "lvm-iscsi-csi.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lvm-iscsi-csi
{{- end -}}

{{/* Labels of one component: call with (dict "ctx" $ "component" "controller"). */}}
{{- define "lvm-iscsi-csi.componentLabels" -}}
{{ include "lvm-iscsi-csi.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "lvm-iscsi-csi.componentSelector" -}}
{{ include "lvm-iscsi-csi.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* repository:tag, or repository@digest when a digest is given. Call with an image dict and a default tag. */}}
{{- define "lvm-iscsi-csi.imageRef" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .defaultTag .image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "lvm-iscsi-csi.image" -}}
{{- include "lvm-iscsi-csi.imageRef" (dict "image" .Values.image "defaultTag" .Chart.AppVersion) -}}
{{- end -}}

{{- define "lvm-iscsi-csi.sidecarImage" -}}
{{- include "lvm-iscsi-csi.imageRef" (dict "image" .image "defaultTag" "") -}}
{{- end -}}

{{- define "lvm-iscsi-csi.topologyKey" -}}
topology.{{ .Values.driverName }}/zone
{{- end -}}

{{/* "true" when the cluster serves snapshot.storage.k8s.io/v1 VolumeSnapshotClass (the snapshot CRDs), else "". */}}
{{- define "lvm-iscsi-csi.hasSnapshotApi" -}}
{{- if .Capabilities.APIVersions.Has "snapshot.storage.k8s.io/v1/VolumeSnapshotClass" -}}true{{- end -}}
{{- end -}}

{{/* The Secret with the CA's certificate (tls.crt) and key (tls.key): mounted into the controller only. */}}
{{- define "lvm-iscsi-csi.caSecretName" -}}
{{- default (printf "%s-ca" (include "lvm-iscsi-csi.fullname" .)) .Values.tls.caSecretName -}}
{{- end -}}

{{/* The ConfigMap with the CA certificate(s) every pod trusts (ca.crt). */}}
{{- define "lvm-iscsi-csi.caConfigMapName" -}}
{{- printf "%s-ca" (include "lvm-iscsi-csi.fullname" .) -}}
{{- end -}}

{{/* The signerName of the driver's CertificateSigningRequests: unique per cluster, as the driver name is. */}}
{{- define "lvm-iscsi-csi.signerName" -}}
{{- printf "%s/identity" .Values.driverName -}}
{{- end -}}

{{/* Where each driver process keeps its own certificate (an emptyDir in memory; renewed in place). */}}
{{- define "lvm-iscsi-csi.tlsDir" -}}
/run/lvm-iscsi-csi/tls
{{- end -}}

{{/*
The generated CA (tls.generate), as YAML {tls.crt, tls.key}, base64 as they go into a Secret's data. The
existing Secret is read back with lookup, so `helm upgrade` keeps the CA; only when it is missing or incomplete
is a new one made (an EC P-256 key). Computed once per render and cached, so that the Secret, the ConfigMap and
the pods' checksum annotations agree.
*/}}
{{- define "lvm-iscsi-csi.caData" -}}
{{- if not (hasKey .Release "lvmIscsiCsiCa") -}}
{{- $found := (lookup "v1" "Secret" .Release.Namespace (include "lvm-iscsi-csi.caSecretName" .)).data | default dict -}}
{{- $result := dict -}}
{{- if and (index $found "tls.crt") (index $found "tls.key") -}}
{{- $result = pick $found "tls.crt" "tls.key" -}}
{{- else -}}
{{- $ca := genCAWithKey (printf "%s-ca" (include "lvm-iscsi-csi.fullname" .)) (int .Values.tls.validityDays) (genPrivateKey "ecdsa") -}}
{{- $result = dict "tls.crt" ($ca.Cert | b64enc) "tls.key" ($ca.Key | b64enc) -}}
{{- end -}}
{{- $_ := set .Release "lvmIscsiCsiCa" $result -}}
{{- end -}}
{{- toYaml (get .Release "lvmIscsiCsiCa") -}}
{{- end -}}

{{/* The CA certificate(s) every pod trusts, PEM: the generated CA's, or tls.caCertificate; empty when the
user makes the ConfigMap (tls.generate=false without tls.caCertificate). */}}
{{- define "lvm-iscsi-csi.caCertificate" -}}
{{- if .Values.tls.generate -}}
{{- index (include "lvm-iscsi-csi.caData" . | fromYaml) "tls.crt" | b64dec -}}
{{- else -}}
{{- .Values.tls.caCertificate -}}
{{- end -}}
{{- end -}}

{{/* A checksum that changes with the CA, so that every pod restarts (and gets a new certificate) when it
changes. Certificates renewed from the same CA need no restart. */}}
{{- define "lvm-iscsi-csi.caChecksum" -}}
{{- printf "%s/%s" (include "lvm-iscsi-csi.caCertificate" .) (include "lvm-iscsi-csi.caSecretName" .) | sha256sum -}}
{{- end -}}

{{/* What the agent and the node plugin pass to obtain their certificate through the controller's signer. */}}
{{- define "lvm-iscsi-csi.podCertificateArgs" -}}
- --tls-dir={{ include "lvm-iscsi-csi.tlsDir" . }}
- --csr-signer={{ include "lvm-iscsi-csi.signerName" . }}
- --ca-file=/etc/lvm-iscsi-csi/ca.crt
{{- end -}}

{{/* The process's own certificate: an emptyDir in memory (the key never reaches a disk). */}}
{{- define "lvm-iscsi-csi.tlsVolume" -}}
- name: tls
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
{{- end -}}

{{- define "lvm-iscsi-csi.tlsMount" -}}
- name: tls
  mountPath: {{ include "lvm-iscsi-csi.tlsDir" . }}
{{- end -}}

{{/* The CA bundle every pod trusts, as an item of a projected volume mounted at /etc/lvm-iscsi-csi. */}}
{{- define "lvm-iscsi-csi.caBundleSource" -}}
- configMap:
    name: {{ include "lvm-iscsi-csi.caConfigMapName" . }}
    items:
      - key: ca.crt
        path: ca.crt
{{- end -}}

{{/* Projected service-account token, mounted only into the containers that talk to the API server. Bound to
the pod (and so to its node): the controller's signer reads pod and node from it (csi/certsigner.py). */}}
{{- define "lvm-iscsi-csi.apiAccessVolume" -}}
- name: kube-api-access
  projected:
    defaultMode: 0444
    sources:
      - serviceAccountToken:
          path: token
          expirationSeconds: 3607
      - configMap:
          name: kube-root-ca.crt
          items:
            - key: ca.crt
              path: ca.crt
      - downwardAPI:
          items:
            - path: namespace
              fieldRef:
                fieldPath: metadata.namespace
{{- end -}}

{{/* The label selector of the storage nodes: agent.nodeSelector as key=value,... (discovery uses it). */}}
{{- define "lvm-iscsi-csi.storageNodeSelector" -}}
{{- $terms := list -}}
{{- range $k, $v := .Values.agent.nodeSelector -}}
{{- $terms = append $terms (printf "%s=%s" $k $v) -}}
{{- end -}}
{{- join "," (sortAlpha $terms) -}}
{{- end -}}

{{- define "lvm-iscsi-csi.apiAccessMount" -}}
- name: kube-api-access
  mountPath: /var/run/secrets/kubernetes.io/serviceaccount
  readOnly: true
{{- end -}}

{{/* Checks of values that the schema cannot express, and of the Kubernetes version. */}}
{{- define "lvm-iscsi-csi.validate" -}}
{{- $kube := .Capabilities.KubeVersion.Version -}}
{{- if not (semverCompare ">=1.34.0-0" $kube) -}}
{{- fail (printf "Kubernetes %s is too old for this chart: it needs 1.34 or later (csi-provisioner v6 and csi-resizer v2 use the storage.k8s.io/v1 VolumeAttributesClass API, GA in 1.34). helm install and helm upgrade read the version from the cluster; helm template and helm lint assume one unless told (v1.20.0 in a helm built from source): pass --kube-version with your cluster's version, e.g. --kube-version 1.35.0" $kube) -}}
{{- end -}}
{{- $names := dict -}}
{{- range .Values.storageNodes -}}
{{- if hasKey $names .name -}}
{{- fail (printf "storageNodes: node %q is listed twice" .name) -}}
{{- end -}}
{{- $_ := set $names .name true -}}
{{- end -}}
{{- $pools := dict -}}
{{- range .Values.agent.pools -}}
{{- if hasKey $pools .name -}}
{{- fail (printf "agent.pools: pool %q is defined twice" .name) -}}
{{- end -}}
{{- $_ := set $pools .name . -}}
{{- if and (not .thinPool) (ne (float64 (default 1.0 .overprovisionRatio)) 1.0) -}}
{{- fail (printf "agent.pools: pool %q is thick (no thinPool): its overprovisionRatio must be 1" .name) -}}
{{- end -}}
{{- if gt (int (default 80 .warnFillPercent)) (int (default 90 .maxFillPercent)) -}}
{{- fail (printf "agent.pools: pool %q: warnFillPercent must not exceed maxFillPercent" .name) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.storageNodes (not .Values.agent.devices) -}}
{{- fail "agent.devices is empty: list the disks (or globs) that hold the pools' physical volumes, e.g. [/dev/sdb]; the agent lets LVM scan nothing else" -}}
{{- end -}}
{{- $defaults := 0 -}}
{{- range .Values.storageClasses -}}
{{- if not (hasKey $pools .pool) -}}
{{- fail (printf "storageClasses: class %q names pool %q, which agent.pools does not define" .name .pool) -}}
{{- end -}}
{{- $thinPool := (get $pools .pool).thinPool -}}
{{- if and (eq .type "thin") (not $thinPool) -}}
{{- fail (printf "storageClasses: class %q is type thin but pool %q has no thinPool" .name .pool) -}}
{{- end -}}
{{- if and (eq .type "thin") (hasKey . "wipe") -}}
{{- fail (printf "storageClasses: class %q: wipe applies to thick volumes only" .name) -}}
{{- end -}}
{{- if .isDefault -}}
{{- $defaults = add1 $defaults -}}
{{- end -}}
{{- end -}}
{{- if gt $defaults 1 -}}
{{- fail "storageClasses: more than one class has isDefault: true" -}}
{{- end -}}
{{- end -}}

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

{{- define "lvm-iscsi-csi.agentSecretName" -}}
{{- default (printf "%s-agent-tls" (include "lvm-iscsi-csi.fullname" .)) .Values.tls.agentSecretName -}}
{{- end -}}

{{- define "lvm-iscsi-csi.controllerSecretName" -}}
{{- default (printf "%s-controller-tls" (include "lvm-iscsi-csi.fullname" .)) .Values.tls.controllerSecretName -}}
{{- end -}}

{{/*
The controller-to-agent TLS material, as YAML: {agent: {ca.crt, tls.crt, tls.key}, controller: {...}}, each
value base64 as it goes into a Secret's data. Existing Secrets are read back with lookup, so `helm upgrade`
keeps the CA and the certificates; only when either Secret is missing or incomplete is a new CA made, with both
certificates (a certificate signed by a CA whose key the chart no longer has cannot be re-issued). The result
is computed once per render and cached, so the Secrets and the pods' checksum annotations agree.
*/}}
{{- define "lvm-iscsi-csi.tlsData" -}}
{{- if not (hasKey .Release "lvmIscsiCsiTls") -}}
{{- $ns := .Release.Namespace -}}
{{- $agent := (lookup "v1" "Secret" $ns (include "lvm-iscsi-csi.agentSecretName" .)).data | default dict -}}
{{- $controller := (lookup "v1" "Secret" $ns (include "lvm-iscsi-csi.controllerSecretName" .)).data | default dict -}}
{{- $keys := list "ca.crt" "tls.crt" "tls.key" -}}
{{- $complete := true -}}
{{- range $k := $keys -}}
{{- if or (not (index $agent $k)) (not (index $controller $k)) -}}
{{- $complete = false -}}
{{- end -}}
{{- end -}}
{{- $result := dict -}}
{{- if and $complete (eq (index $agent "ca.crt") (index $controller "ca.crt")) -}}
{{- $_ := set $result "agent" (pick $agent "ca.crt" "tls.crt" "tls.key") -}}
{{- $_ := set $result "controller" (pick $controller "ca.crt" "tls.crt" "tls.key") -}}
{{- else -}}
{{- $days := int .Values.tls.validityDays -}}
{{- $ca := genCA (printf "%s-ca" (include "lvm-iscsi-csi.fullname" .)) $days -}}
{{- $agentCert := genSignedCert "lvm-iscsi-agent" nil (list "lvm-iscsi-agent") $days $ca -}}
{{- $controllerCert := genSignedCert "lvm-iscsi-controller" nil nil $days $ca -}}
{{- $_ := set $result "agent" (dict "ca.crt" ($ca.Cert | b64enc) "tls.crt" ($agentCert.Cert | b64enc) "tls.key" ($agentCert.Key | b64enc)) -}}
{{- $_ := set $result "controller" (dict "ca.crt" ($ca.Cert | b64enc) "tls.crt" ($controllerCert.Cert | b64enc) "tls.key" ($controllerCert.Key | b64enc)) -}}
{{- end -}}
{{- $_ := set .Release "lvmIscsiCsiTls" $result -}}
{{- end -}}
{{- toYaml (get .Release "lvmIscsiCsiTls") -}}
{{- end -}}

{{/* A checksum that changes when the TLS material changes, so the pods roll on rotation. */}}
{{- define "lvm-iscsi-csi.tlsChecksum" -}}
{{- if .Values.tls.generate -}}
{{- include "lvm-iscsi-csi.tlsData" . | sha256sum -}}
{{- else -}}
{{- printf "%s/%s" (include "lvm-iscsi-csi.agentSecretName" .) (include "lvm-iscsi-csi.controllerSecretName" .) | sha256sum -}}
{{- end -}}
{{- end -}}

{{/* Projected service-account token, mounted only into the containers that talk to the API server. */}}
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

{{- define "lvm-iscsi-csi.apiAccessMount" -}}
- name: kube-api-access
  mountPath: /var/run/secrets/kubernetes.io/serviceaccount
  readOnly: true
{{- end -}}

{{/* Checks of values that the schema cannot express. */}}
{{- define "lvm-iscsi-csi.validate" -}}
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

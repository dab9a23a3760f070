{{/* Chart name, overridable. */}}
{{- define "vram-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Prefix of every object name: the release name, plus the chart name unless the release name
already holds it. Kept to 52 characters so "-operator" and "-agent" suffixes stay within 63.
*/}}
{{- define "vram-operator.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "vram-operator.operatorName" -}}
{{- printf "%s-operator" (include "vram-operator.fullname" .) -}}
{{- end -}}

{{- define "vram-operator.agentName" -}}
{{- printf "%s-agent" (include "vram-operator.fullname" .) -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "vram-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "vram-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: vram-operator
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component; call with (dict "root" $ "component" "operator"). */}}
{{- define "vram-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vram-operator.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* All labels of one component's objects; same argument as selectorLabels. */}}
{{- define "vram-operator.componentLabels" -}}
{{ include "vram-operator.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "vram-operator.operatorServiceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (include "vram-operator.operatorName" .) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "vram-operator.agentServiceAccountName" -}}
{{- if .Values.agent.serviceAccount.create -}}
{{- default (include "vram-operator.agentName" .) .Values.agent.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.agent.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* "repository:tag" of the vram-operator image; the tag defaults to appVersion. */}}
{{- define "vram-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
True (non-empty) when the agent container must run as root: dropping the page cache and
removing other processes' shared memory both need it.
*/}}
{{- define "vram-operator.agentNeedsRoot" -}}
{{- if or .Values.agent.dropPageCacheAbove .Values.agent.cleanOrphanShm -}}true{{- end -}}
{{- end -}}

{{/*
Security context of the agent container: the values' non-root context unless a switch needs
root, then root with exactly what that switch needs (privileged for drop_caches,
CAP_SYS_ADMIN for removing shared-memory segments).
*/}}
{{- define "vram-operator.agentSecurityContext" -}}
{{- if include "vram-operator.agentNeedsRoot" . -}}
runAsNonRoot: false
runAsUser: 0
runAsGroup: 0
readOnlyRootFilesystem: true
{{- if .Values.agent.dropPageCacheAbove }}
privileged: true
allowPrivilegeEscalation: true
{{- else }}
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
  add: ["SYS_ADMIN"]
{{- end }}
{{- else -}}
{{ toYaml .Values.agent.securityContext }}
{{- end -}}
{{- end -}}

{{/*
Resources of a model-serving sidecar: its CPU and memory plus `gpus` GPUs as a limit (the
device plugin treats the limit as the request), quoted: a bare number is not a quantity
to server-side apply. Call with
(dict "resources" .Values.ollama.resources "gpus" .Values.ollama.gpus "resourceName" ...).
*/}}
{{- define "vram-operator.sidecarResources" -}}
{{- $resources := deepCopy (default dict .resources) -}}
{{- if gt (int .gpus) 0 -}}
{{- $limits := deepCopy (default dict $resources.limits) -}}
{{- $_ := set $limits .resourceName (toString (int .gpus)) -}}
{{- $_ := set $resources "limits" $limits -}}
{{- end -}}
{{- toYaml $resources -}}
{{- end -}}

{{/*
A pod volume for a sidecar's storage values. Call with (dict "name" "ollama-models"
"storage" .Values.ollama.storage "what" "ollama.storage").
*/}}
{{- define "vram-operator.storageVolume" -}}
- name: {{ .name }}
{{- if eq .storage.type "hostPath" }}
  hostPath:
    path: {{ required (printf "%s.hostPath is required for type hostPath" .what) .storage.hostPath }}
    type: DirectoryOrCreate
{{- else if eq .storage.type "emptyDir" }}
  {{- if .storage.sizeLimit }}
  emptyDir:
    sizeLimit: {{ .storage.sizeLimit }}
  {{- else }}
  emptyDir: {}
  {{- end }}
{{- else if eq .storage.type "persistentVolumeClaim" }}
  persistentVolumeClaim:
    claimName: {{ required (printf "%s.existingClaim is required for type persistentVolumeClaim" .what) .storage.existingClaim }}
{{- else }}
{{- fail (printf "%s.type must be hostPath, emptyDir or persistentVolumeClaim, not %q" .what .storage.type) }}
{{- end }}
{{- end -}}

{{/* apiVersion of PodDisruptionBudget: policy/v1 from Kubernetes 1.21, policy/v1beta1 before. */}}
{{- define "vram-operator.pdbApiVersion" -}}
{{- if semverCompare ">=1.21-0" .Capabilities.KubeVersion.Version -}}
policy/v1
{{- else -}}
policy/v1beta1
{{- end -}}
{{- end -}}

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

{{/*
`--metrics-address=...` for the operator and the agent, from metrics.bindAddress: the pod IP
(the container's POD_IP, from the downward API) or loopback.
*/}}
{{- define "vram-operator.metricsAddressArg" -}}
{{- if eq .Values.metrics.bindAddress "loopback" -}}
--metrics-address=127.0.0.1
{{- else if eq .Values.metrics.bindAddress "podIP" -}}
--metrics-address=$(POD_IP)
{{- else -}}
{{- fail (printf "metrics.bindAddress must be podIP or loopback, not %q" .Values.metrics.bindAddress) -}}
{{- end -}}
{{- end -}}

{{/* True (non-empty) when /metrics listens on the pod IP, where Services and probes reach it. */}}
{{- define "vram-operator.metricsOnPodIP" -}}
{{- if ne .Values.metrics.bindAddress "loopback" -}}true{{- end -}}
{{- end -}}

{{/*
A liveness probe on the metrics port. On the pod IP it is the values' probe as written; on
loopback, where the kubelet cannot connect, an httpGet becomes an exec of the image's
python3 against 127.0.0.1 (same path and timings). Call with
(dict "root" $ "probe" .Values.agent.livenessProbe "port" .Values.agent.metricsPort).
*/}}
{{- define "vram-operator.metricsProbe" -}}
{{- if and (not (include "vram-operator.metricsOnPodIP" .root)) .probe.httpGet -}}
{{- $probe := omit .probe "httpGet" -}}
{{- $url := printf "http://127.0.0.1:%d%s" (int .port) (default "/healthz" .probe.httpGet.path) -}}
{{- $code := printf "import urllib.request; urllib.request.urlopen(%q, timeout=4)" $url -}}
{{- $_ := set $probe "exec" (dict "command" (list "python3" "-c" $code)) -}}
{{ toYaml $probe }}
{{- else -}}
{{ toYaml .probe }}
{{- end -}}
{{- end -}}

{{/* The agent's ServiceAccount as the API server names the user of its tokens. */}}
{{- define "vram-operator.agentUsername" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "vram-operator.agentServiceAccountName" .) -}}
{{- end -}}

{{/*
True (non-empty) when the GPUNode ValidatingAdmissionPolicy is rendered: admissionPolicy.enabled
true, or "auto" where the cluster serves admissionregistration.k8s.io/v1
ValidatingAdmissionPolicy (Kubernetes 1.30+); never without the agent.
*/}}
{{- define "vram-operator.admissionPolicyEnabled" -}}
{{- $enabled := toString .Values.admissionPolicy.enabled -}}
{{- if .Values.agent.enabled -}}
{{- if eq $enabled "true" -}}true
{{- else if and (eq $enabled "auto") (.Capabilities.APIVersions.Has "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy") -}}true
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The init container that gives hostPath and persistentVolumeClaim model storage to the user
each sidecar runs as (see volumePermissions in values.yaml). Empty when nothing needs it.
*/}}
{{- define "vram-operator.volumePermissions" -}}
{{- $targets := list -}}
{{- $mounts := list -}}
{{- if .Values.volumePermissions.enabled -}}
{{- range $sidecar, $volume := dict "ollama" "ollama-models" "vllm" "vllm-cache" "diffusion" "diffusion-cache" -}}
{{- $values := index $.Values $sidecar -}}
{{- $user := int (default 0 $values.securityContext.runAsUser) -}}
{{- if and $values.enabled (gt $user 0) (has $values.storage.type (list "hostPath" "persistentVolumeClaim")) -}}
{{- $group := int (default 0 $values.securityContext.runAsGroup) -}}
{{- $targets = append $targets (printf "/volumes/%s=%d:%d" $volume $user $group) -}}
{{- $mounts = append $mounts (dict "name" $volume "mountPath" (printf "/volumes/%s" $volume)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if $targets -}}
- name: volume-permissions
  image: {{ include "vram-operator.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  # Each argument is FOLDER=UID:GID. -xdev: no other mount; chown -h: a link, never its target.
  command:
    - sh
    - -c
    - |
      set -eu
      for target in "$@"; do
        folder=${target%%=*}; owner=${target#*=}
        find "$folder" -xdev \( ! -user "${owner%%:*}" -o ! -group "${owner#*:}" \) \
          -exec chown -h "$owner" {} +
      done
    - volume-permissions
  args:
    {{- toYaml $targets | nindent 4 }}
  resources:
    requests:
      cpu: 10m
      memory: 16Mi
    limits:
      memory: 64Mi
  securityContext:
    runAsNonRoot: false
    runAsUser: 0
    runAsGroup: 0
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    capabilities:
      drop: ["ALL"]
      add: ["CHOWN", "DAC_OVERRIDE"]
  volumeMounts:
    {{- toYaml $mounts | nindent 4 }}
{{- end -}}
{{- end -}}

{{/*
A map of labels as a selector of equalities, key=value joined by commas, keys sorted.
*/}}
{{- define "vram-operator.labelSelector" -}}
{{- $items := list -}}
{{- range $key, $value := . -}}
{{- $items = append $items (printf "%s=%s" $key $value) -}}
{{- end -}}
{{- join "," $items -}}
{{- end }}

;;;; sbmon-agent-control.lisp -- the control and evaluation operations of the sbmon agent,
;;;; loaded on first use.
;;;;
;;;; This file owns :gc-run :gc-tune :kill-thread :profile (sb-sprof) :eval and
;;;; :reload-system (ASDF).  It is part of the agent (package SBMON-AGENT) but is not loaded
;;;; with it: an image pays on every nursery collection for each class the agent defines
;;;; (the captured-output stream below is one), and most images are never asked to collect,
;;;; profile or evaluate.  sbmon-agent.lisp loads it, once, on the first call of one of these
;;;; operations that START's :allow lets through, from the directory sbmon-agent.lisp was
;;;; loaded from (section "Parts loaded on first use" there); loading it by hand after the
;;;; agent works too.  Threads it starts are registered with REGISTER-CONTROL-THREAD, which
;;;; STOP ends; the argument keywords of its operations are interned by the resident agent
;;;; (*PART-ARGUMENT-KEYS*).
;;;;
;;;; Sections: limits; :gc-run; :gc-tune; :kill-thread; bounded output stream; condition
;;;; capture; :eval; :profile; :reload-system.

(in-package #:sbmon-agent)

(defconstant +eval-max-output+ 1048576)
(defconstant +value-chars+ 4096)
(defconstant +eval-frames+ 30)
(defconstant +max-warnings+ 100)
(defconstant +warning-chars+ 1000)
(defconstant +reload-output+ 65536)

(defvar *eval-counter* 0)
(sb-ext:defglobal **profile-busy** (vector nil)
  "Slot 0 is non-NIL while a :profile call runs (at most one per image).")

;;; --- :gc-run

(defun gc-count-now ()
  (let ((n (n-gcs)))
    (if (>= n 0) n (aref **stats** +s-count+))))

(defun op-gc-run (args)
  (check-plist args '(:generation :full) :gc-run)
  (let ((full (bool-arg args :full :gc-run))
        (gen (int-arg args :generation :gc-run :default 0 :min 0 :max (1- +generations+))))
    (when (and full (not (eq (getf args :generation :absent) :absent)))
      (fail "BAD-ARGUMENT" ":gc-run takes :full t or :generation N, not both"))
    (let* ((count0 (gc-count-now))
           (heap0 (heap-used))
           (t0 (mono-ns)))
      (if full (sb-ext:gc :full t) (sb-ext:gc :gen gen))
      (let* ((pause (seconds-since t0))
             (heap1 (heap-used))
             (count1 (gc-count-now)))
        (list :generation (if full (1- +generations+) gen)
              :full full
              :heap-before heap0
              :heap-after heap1
              :bytes-freed (- heap0 heap1)     ; negative if other threads consed meanwhile
              :pause-seconds pause
              :gc-count-before count0
              :gc-count-after count1)))))

;;; --- :gc-tune

(defun gc-tuning ()
  (list :nursery-size (sb-ext:bytes-consed-between-gcs)
        :generations
        (loop for g from 0 below +generations+
              collect (list :generation g
                            :bytes-consed-between-gcs (sb-ext:generation-bytes-consed-between-gcs g)
                            :number-of-gcs-before-promotion
                            (sb-ext:generation-number-of-gcs-before-promotion g)
                            :minimum-age-before-gc
                            (coerce (sb-ext:generation-minimum-age-before-gc g) 'double-float)))))

(defun check-size (v what limit)
  (unless (and (integerp v) (<= 1 v limit))
    (fail "BAD-ARGUMENT" "~a ~a is invalid: must be a positive integer <= ~d (the dynamic space size)"
          what (show-arg v) limit))
  v)

(defun parse-tune-entry (e limit)
  "Validate one :generations entry; return (gen bytes promotion age), absent values NIL."
  (unless (and (listp e) (evenp (length e)))
    (fail "BAD-ARGUMENT" ":generations entry ~a must be a plist (:generation G ...)" (show-arg e)))
  (check-plist e '(:generation :bytes-consed-between-gcs :number-of-gcs-before-promotion
                   :minimum-age-before-gc)
               :gc-tune)
  (let ((g (getf e :generation :absent)))
    (cond ((eq g :absent)
           (fail "BAD-ARGUMENT" ":generations entry ~a lacks :generation" (show-arg e)))
          ((eql g (1- +generations+))
           (fail "BAD-ARGUMENT" ":generation ~d is the pseudo-static generation and cannot be tuned"
                 g))
          ((not (and (integerp g) (<= 0 g (- +generations+ 2))))
           (fail "BAD-ARGUMENT" ":generation ~a is invalid: must be an integer in 0..~d"
                 (show-arg g) (- +generations+ 2))))
    (let ((bytes (getf e :bytes-consed-between-gcs))
          (promo (getf e :number-of-gcs-before-promotion))
          (age (getf e :minimum-age-before-gc)))
      (when bytes
        (check-size bytes (format nil ":bytes-consed-between-gcs (generation ~d)" g) limit))
      (when (and promo (not (and (integerp promo) (<= 0 promo 1000))))
        (fail "BAD-ARGUMENT"
              ":number-of-gcs-before-promotion (generation ~d) ~a is invalid: must be an integer in 0..1000"
              g (show-arg promo)))
      (when (and age (not (and (realp age) (<= 0 age 1))))
        (fail "BAD-ARGUMENT"
              ":minimum-age-before-gc (generation ~d) ~a is invalid: must be a number in 0..1"
              g (show-arg age)))
      (list g bytes promo age))))

(defun apply-tuning (nursery entries)
  (when nursery (setf (sb-ext:bytes-consed-between-gcs) nursery))
  (loop for (g bytes promo age) in entries
        do (when bytes (setf (sb-ext:generation-bytes-consed-between-gcs g) bytes))
           (when promo (setf (sb-ext:generation-number-of-gcs-before-promotion g) promo))
           (when age (setf (sb-ext:generation-minimum-age-before-gc g)
                           (coerce age 'double-float)))))

(defun op-gc-tune (args)
  (check-plist args '(:nursery-size :generations) :gc-tune)
  (let* ((limit (sb-ext:dynamic-space-size))
         (nursery (let ((v (getf args :nursery-size :absent)))
                    (if (eq v :absent) nil (check-size v ":nursery-size" limit))))
         (gens (getf args :generations)))
    (unless (listp gens)
      (fail "BAD-ARGUMENT" ":generations must be a list of plists, got ~a" (show-arg gens)))
    (let ((entries (mapcar (lambda (e) (parse-tune-entry e limit)) gens)))
      (loop for (e . rest) on entries
            do (when (find (first e) rest :key #'first)
                 (fail "BAD-ARGUMENT" ":generation ~d appears more than once in :generations"
                       (first e))))
      (let ((before (gc-tuning)))
        ;; everything is valid: apply; restore the old values should a setter refuse
        (handler-case (apply-tuning nursery entries)
          (serious-condition (c)
            (ignore-errors
             (apply-tuning (getf before :nursery-size)
                           (loop for p in (getf before :generations)
                                 for g = (getf p :generation)
                                 when (< g (1- +generations+))
                                   collect (list g (getf p :bytes-consed-between-gcs)
                                                 (getf p :number-of-gcs-before-promotion)
                                                 (getf p :minimum-age-before-gc)))))
            (error c)))
        (list :before before :after (gc-tuning))))))

;;; --- :kill-thread

(defun op-kill-thread (args)
  (check-plist args '(:tid :timeout-ms) :kill-thread)
  (let* ((tid (int-arg args :tid :kill-thread :required t))
         (timeout-ms (int-arg args :timeout-ms :kill-thread :default 2000 :max 60000))
         (thread (find-thread-by-tid tid)))
    (unless thread
      (fail "UNKNOWN-THREAD" "no Lisp thread with tid ~d" tid))
    (let ((name (object-name-string (sb-thread:thread-name thread))))
      (cond ((main-thread-p thread)
             (fail "REFUSED" "thread ~d (~s) is the main thread; it is never killed" tid name))
            ((agent-thread-p thread)
             (fail "REFUSED" "thread ~d (~s) is one of the sbmon agent's own threads" tid name))
            ((thread-daemon-p thread)
             (fail "REFUSED" "thread ~d (~s) is an SBCL system thread" tid name)))
      (let ((t0 (mono-ns)))
        (when (sb-thread:thread-alive-p thread)
          (handler-case (sb-thread:terminate-thread thread)
            ;; it ended on its own meanwhile
            (sb-thread:interrupt-thread-error () nil)))
        (sb-thread:join-thread thread :default nil :timeout (/ timeout-ms 1000d0))
        (list :tid tid :name name
              :ended (not (sb-thread:thread-alive-p thread))
              :waited-seconds (seconds-since t0))))))

;;; --- bounded output stream (gray stream; keeps at most LIMIT characters)

(defclass bounded-output-stream (sb-gray:fundamental-character-output-stream)
  ((buffer :initform (make-array 0 :element-type 'character :adjustable t :fill-pointer 0)
           :reader bounded-buffer)
   (limit :initarg :limit :reader bounded-limit)
   (truncated :initform nil :accessor bounded-truncated)
   (column :initform 0 :accessor bounded-column)))

(defun make-bounded-output-stream (limit)
  (make-instance 'bounded-output-stream :limit limit))

(defun bounded-room (s n)
  "Make room for up to N more characters; return how many fit."
  (let* ((buf (bounded-buffer s))
         (fp (fill-pointer buf))
         (fit (max 0 (min n (- (bounded-limit s) fp)))))
    (when (< fit n) (setf (bounded-truncated s) t))
    (when (> (+ fp fit) (array-dimension buf 0))
      (adjust-array buf (min (bounded-limit s)
                             (max (+ fp fit) (* 2 (array-dimension buf 0)) 256))))
    fit))

(defmethod sb-gray:stream-write-char ((s bounded-output-stream) char)
  (when (= 1 (bounded-room s 1))
    (vector-push char (bounded-buffer s)))
  (setf (bounded-column s) (if (char= char #\Newline) 0 (1+ (bounded-column s))))
  char)

(defmethod sb-gray:stream-write-string ((s bounded-output-stream) string &optional (start 0) end)
  (let* ((end (or end (length string)))
         (n (max 0 (- end start)))
         (fit (bounded-room s n)))
    (when (plusp fit)
      (let* ((buf (bounded-buffer s))
             (fp (fill-pointer buf)))
        (setf (fill-pointer buf) (+ fp fit))
        (replace buf string :start1 fp :start2 start :end2 (+ start fit))))
    (let ((nl (position #\Newline string :start start :end end :from-end t)))
      (setf (bounded-column s) (if nl (- end nl 1) (+ (bounded-column s) n))))
    string))

(defmethod sb-gray:stream-line-column ((s bounded-output-stream))
  (bounded-column s))

(defmethod sb-gray:stream-start-line-p ((s bounded-output-stream))
  (zerop (bounded-column s)))

(defun bounded-text (s)
  (coerce (bounded-buffer s) 'simple-string))

(defmacro with-captured-io ((out) &body body)
  "Run BODY with the standard output streams going to OUT and an empty input."
  (let ((in (gensym "IN")) (io (gensym "IO")))
    `(let* ((,in (make-string-input-stream ""))
            (,io (make-two-way-stream ,in ,out))
            (*standard-output* ,out) (*error-output* ,out) (*trace-output* ,out)
            (*standard-input* ,in) (*terminal-io* ,io) (*query-io* ,io) (*debug-io* ,io))
       ,@body)))

;;; --- condition capture (type, message, bounded backtrace) without the debugger

(defun frame-starts-with-p (frame prefixes)
  (some (lambda (p) (and (>= (length frame) (length p)) (string= p frame :end2 (length p))))
        prefixes))

(defun agent-frame-p (frame)
  (or (frame-starts-with-p frame '("(SBMON-AGENT::"))
      (let ((head (subseq frame 0 (min (length frame) 100))))
        (and (char= (char head 0) #\() (> (length head) 1) (char= (char head 1) #\()
             (search ":IN SBMON-AGENT::" head)))))

(defun printed-frames-for-condition ()
  "Printed frames of the current thread from where the condition was signalled (the frames
of the hook and of the condition system above it dropped), ending before the first frame
of the agent's own code; at most +EVAL-FRAMES+."
  (let* ((raw (handler-case
                  (let ((*print-pretty* nil))
                    (mapcar #'print-frame
                            (list-frames :count (+ +eval-frames+ 40)
                                                     :from :current-frame)))
                (serious-condition () nil)))
         (last-system (let ((last nil))
                        (loop for f in raw
                              for i from 0 below 10
                              when (frame-starts-with-p f '("(INVOKE-DEBUGGER " "(SB-DEBUG::RUN-HOOK "
                                                           "(SB-KERNEL::%SIGNAL " "(SIGNAL "))
                                do (setf last i))
                        last))
         (top (if last-system (nthcdr (1+ last-system) raw) raw))
         (end (position-if #'agent-frame-p top)))
    (subseq top 0 (min +eval-frames+ (or end (length top))))))

(defun condition-failure (c)
  "(type message frames) for condition C, computed where it was signalled."
  (list (condition-type-name c)
        (condition-message c)
        (printed-frames-for-condition)))

;;; --- :eval

(defun print-value (v)
  (handler-case
      (let ((*print-length* 100) (*print-level* 10) (*print-readably* nil)
            (out (make-bounded-output-stream (1+ +value-chars+))))
        (prin1 v out)
        (let ((text (bounded-text out)))
          (if (> (length text) +value-chars+)
              (concatenate 'string (subseq text 0 (- +value-chars+ 3)) "...")
              text)))
    (serious-condition (c)
      (format nil "#<error printing a value: ~a>" (condition-message c)))))

(defun %eval-forms (code state)
  "Read and evaluate the forms of CODE one after another; return the printed values of the
last one.  STATE is a vector whose slot 0 counts evaluated forms."
  (let ((eof '#:eof) (values '()))
    (with-input-from-string (in code)
      (loop
        (let ((form (read in nil eof)))
          (when (eq form eof) (return))
          (setf values (multiple-value-list (eval form)))
          (incf (svref state 0)))))
    (mapcar #'print-value values)))

(defun eval-in-thread (code package out)
  "Body of an eval thread.  Returns (:ok printed-values forms seconds) or
(:failed type message frames forms seconds).  No handler is established around the user's
code (a handler would see conditions the code signals on purpose): a condition that would
enter the debugger reaches the debugger hooks, which record it and unwind."
  (let ((state (vector 0)) (t0 (mono-ns)))
    (flet ((hook (c hook)
             (declare (ignore hook))
             (throw 'sbmon-eval-failed
               (list* :failed (append (condition-failure c)
                                      (list (svref state 0) (seconds-since t0)))))))
      (catch 'sbmon-eval-failed
        (let ((*debugger-hook* #'hook)
              (sb-ext:*invoke-debugger-hook* #'hook))
          (with-standard-io-syntax
            (let ((*package* package) (*read-eval* nil) (*print-readably* nil)
                  ;; with-standard-io-syntax rebinds neither hook, but be explicit
                  (*debugger-hook* #'hook)
                  (sb-ext:*invoke-debugger-hook* #'hook))
              (with-captured-io (out)
                (let ((printed (%eval-forms code state)))
                  (list :ok printed (svref state 0) (seconds-since t0)))))))))))

(defun op-eval (args)
  (check-plist args '(:code :package :timeout-s :max-output) :eval)
  (let* ((code (string-arg args :code :eval :required t))
         (package-name (string-arg args :package :eval :default "CL-USER" :max 200))
         (timeout (real-arg args :timeout-s :eval :default 10 :min 0.1d0 :max 300))
         (max-output (int-arg args :max-output :eval :default 65536 :min 0 :max +eval-max-output+))
         (package (or (find-package package-name) (find-package (string-upcase package-name))
                      (fail "BAD-ARGUMENT" "no package named ~s" package-name)))
         (out (make-bounded-output-stream max-output))
         (box (vector nil))
         (n (sb-thread:with-mutex (*state-lock*) (incf *eval-counter*)))
         (thread nil))
    (unwind-protect
         (progn
           ;; not under CALL-QUIETLY: EVAL-IN-THREAD sets up the evaluation's own streams
           ;; and debugger hooks
           (setf thread (spawn (format nil "sbmon-agent eval ~d" n)
                               (lambda ()
                                 (setf (svref box 0) (eval-in-thread code package out)))
                               :quietly nil))
           (register-control-thread thread)
           (sb-thread:join-thread thread :default nil :timeout timeout)
           (let ((result (svref box 0))
                 (output (list :output (bounded-text out)
                               :output-truncated (bounded-truncated out))))
             (cond
               ((eq (first result) :ok)
                (destructuring-bind (printed forms seconds) (rest result)
                  (list* :values printed
                         (append output (list :forms forms :seconds seconds)))))
               ((eq (first result) :failed)
                (destructuring-bind (type message frames forms seconds) (rest result)
                  (declare (ignore seconds))
                  (fail-with type (list* :backtrace frames :forms forms output) "~a" message)))
               ((sb-thread:thread-alive-p thread)
                (ignore-errors (sb-thread:terminate-thread thread))
                (sb-thread:join-thread thread :default nil :timeout 2)
                (let ((stopped (not (sb-thread:thread-alive-p thread))))
                  (fail-with "TIMEOUT" output
                             "evaluation exceeded ~a s and ~:[could not be stopped within 2 s (thread ~s still running)~;was stopped~*~]"
                             (number-text timeout) stopped (sb-thread:thread-name thread))))
               ((exit-in-progress-p)
                (fail-with "IMAGE-EXITING" output
                           "the image is exiting (the evaluation called sb-ext:exit or another thread did)"))
               (t
                (fail-with "ABORTED" output
                           "the evaluation thread ended without a result (it was terminated or called abort-thread)")))))
      (when thread
        (unregister-control-thread thread)
        ;; the worker was unwound (agent stopping): don't leave the evaluation behind
        (when (and (sb-thread:thread-alive-p thread) (null (svref box 0)))
          (ignore-errors (sb-thread:terminate-thread thread)))))))

;;; --- :profile

(defun sprof-call (name &rest args)
  "Call sb-sprof's function NAME (some of those used are internal to sb-sprof)."
  (apply (or (contrib-function "SB-SPROF" name)
             (fail "UNAVAILABLE" "sb-sprof has no function ~a on this SBCL" name))
         args))

(defun ensure-module (module package)
  (unless (find-package package)
    (handler-case (require module)
      (serious-condition (c)
        (fail "UNAVAILABLE" "cannot load ~(~a~): ~a" module (condition-message c))))
    (unless (find-package package)
      (fail "UNAVAILABLE" "loading ~(~a~) did not define package ~a" module package))))

(defun profile-name (name)
  (if (stringp name)
      (one-line name +frame-chars+)
      (one-line (safe-string (lambda (s) (let ((*print-length* 10) (*print-level* 4)) (prin1 name s)))
                             (* 2 +frame-chars+))
                +frame-chars+)))

(defconstant +profile-max-stacks+ 1000
  "Distinct stacks a :profile reply carries, most samples first; the rest are summed into
one \"[other stacks]\" stack, so the stacks' counts always add up to the samples.")
(defconstant +profile-max-depth+ 128
  "Frames kept of one sample's stack, leaf first; a deeper stack starts with \"[truncated]\".")

(defun frame-base-name (name)
  "The global function a frame's function belongs to: FOO for FOO, (FLET X :IN FOO) and
(LAMBDA () :IN FOO)."
  (loop for in = (and (consp name) (member :in name))
        while (and in (cdr in))
        do (setf name (second in)))
  name)

(defun runtime-frame-p (info name)
  "True of frames that say how a sample was taken rather than what ran: unknown and foreign
frames, allocation and thread trampolines, SB-THREAD::RUN, and sb-sprof's own."
  (or (null info)
      (stringp info)
      (let ((base (frame-base-name name)))
        (and (symbolp base)
             (let ((package (symbol-package base)))
               (or (search "-TRAMP" (symbol-name base))
                   (and package (string= (package-name package) "SB-SPROF"))
                   (and package (string= (package-name package) "SB-THREAD")
                        (string= (symbol-name base) "RUN"))))))))

(defun profile-stacks (keep-runtime)
  "Aggregate sb-sprof's traces into (values FRAMES STACKS SAMPLES PER-THREAD): FRAMES a
vector of frame names, STACKS a hash table from a key string (one character per frame
index, root first) to its sample count, SAMPLES the number of traces, PER-THREAD an alist
of (thread . samples)."
  (let ((names (make-hash-table :test 'equal)) ; frame name -> index
        (frames (make-array 64 :adjustable t :fill-pointer 0))
        (infos (make-hash-table :test 'eq))    ; debug info -> index, or :runtime
        (stacks (make-hash-table :test 'equal))
        (per-thread '())
        (samples 0)
        ;; the last +profile-max-depth+ frames of the sample, a ring (sb-sprof goes root first)
        (path (make-array +profile-max-depth+))
        (depth 0))
    (labels ((intern-name (name)
               (or (gethash name names)
                   (setf (gethash name names) (vector-push-extend name frames))))
             (frame-index (info)
               (multiple-value-bind (index found) (gethash info infos)
                 (if found
                     index
                     (setf (gethash info infos)
                           (let ((name (if (typep info 'sb-di:debug-fun)
                                           (sb-di:debug-fun-name info)
                                           info)))
                             (if (and (not keep-runtime) (runtime-frame-p info name))
                                 :runtime
                                 (intern-name (if (null info)
                                                  "[unknown]"
                                                  (profile-name name))))))))))
      (sprof-call "MAP-TRACES"
                  (lambda (thread trace)
                    (incf samples)
                    (let ((entry (assoc thread per-thread :test #'eq)))
                      (if entry (incf (cdr entry)) (push (cons thread 1) per-thread)))
                    (setf depth 0)
                    (sprof-call "MAP-TRACE-PC-LOCS"
                                (lambda (info pc)
                                  (declare (ignore pc))
                                  (let ((index (frame-index info)))
                                    (unless (eq index :runtime)
                                      (setf (svref path (mod depth +profile-max-depth+)) index)
                                      (incf depth))))
                                trace)
                    (let* ((truncated (> depth +profile-max-depth+))
                           (kept (min depth +profile-max-depth+))
                           (first (if truncated (mod depth +profile-max-depth+) 0))
                           (key (make-string (+ kept (if truncated 1 0)))))
                      (when truncated
                        (setf (char key 0) (code-char (intern-name "[truncated]"))))
                      (loop for k below kept
                            for j from (if truncated 1 0)
                            do (setf (char key j)
                                     (code-char (svref path (mod (+ first k) +profile-max-depth+)))))
                      (incf (gethash key stacks 0))))
                  (symbol-value (contrib-variable "SB-SPROF" "*SAMPLES*"))))
    (values frames stacks samples per-thread)))

(defun profile-result (mode seconds max-rows keep-runtime)
  (multiple-value-bind (frames stacks nsamples per-thread) (profile-stacks keep-runtime)
    (let* ((nframes (length frames))
           (self (make-array nframes :initial-element 0))
           (cum (make-array nframes :initial-element 0))
           (seen (make-array nframes :initial-element -1))
           (sorted '())
           (pct (lambda (k) (if (plusp nsamples) (/ (* 100d0 k) nsamples) 0d0))))
      ;; self: the leaf of each stack; cumulative: each function once per stack, so a
      ;; recursive function never counts more than the samples it is on
      (let ((serial 0))
        (maphash (lambda (key count)
                   (push (cons key count) sorted)
                   (incf serial)
                   (when (plusp (length key))
                     (incf (aref self (char-code (char key (1- (length key))))) count))
                   (loop for c across key
                         for i = (char-code c)
                         unless (= (aref seen i) serial)
                           do (setf (aref seen i) serial)
                              (incf (aref cum i) count)))
                 stacks))
      (setf sorted (sort sorted #'> :key #'cdr))
      (let* ((kept (subseq sorted 0 (min +profile-max-stacks+ (length sorted))))
             (other (reduce #'+ (nthcdr (length kept) sorted) :key #'cdr))
             (order (sort (loop for i below nframes collect i)
                          (lambda (a b)
                            (or (> (aref self a) (aref self b))
                                (and (= (aref self a) (aref self b))
                                     (> (aref cum a) (aref cum b))))))))
        (list :mode mode
              :seconds (coerce seconds 'double-float)
              :samples nsamples
              :rows (loop for i in order
                          for n from 0 below max-rows
                          collect (list :function (aref frames i)
                                        :samples (aref self i)
                                        :self-percent (funcall pct (aref self i))
                                        :cumulative-percent (funcall pct (aref cum i))))
              :threads (mapcar (lambda (e) (object-name-string (sb-thread:thread-name (car e))))
                               per-thread)
              :thread-samples (mapcar (lambda (e)
                                        (list :thread (object-name-string
                                                       (sb-thread:thread-name (car e)))
                                              :samples (cdr e)))
                                      per-thread)
              :frames (coerce frames 'list)
              :stacks (append
                       (loop for (key . count) in kept
                             collect (list :samples count
                                           :frames (map 'list #'char-code key)))
                       (when (plusp other)
                         (list (list :samples other :other t :frames '()))))
              :stacks-dropped (- (length sorted) (length kept))
              :max-stacks +profile-max-stacks+
              :max-depth +profile-max-depth+
              :runtime-frames (if keep-runtime :kept :folded))))))

(defun op-profile (args)
  (check-plist args '(:seconds :mode :max-rows :keep-runtime-frames) :profile)
  (let ((seconds (real-arg args :seconds :profile :default 5 :min 0.1d0 :max 60))
        (mode (getf args :mode :cpu))
        (max-rows (int-arg args :max-rows :profile :default 20 :max 200))
        (keep-runtime (bool-arg args :keep-runtime-frames :profile))
        (self sb-thread:*current-thread*))
    (unless (member mode '(:cpu :alloc :time))
      (fail "BAD-ARGUMENT" ":mode must be :cpu, :alloc or :time for :profile, got ~a" (show-arg mode)))
    (unless (null (sb-ext:compare-and-swap (svref **profile-busy** 0) nil self))
      (fail "BUSY" "a profile is already running in this image"))
    (unwind-protect
         (progn
           (register-control-thread self)
           (ensure-module :sb-sprof "SB-SPROF")
           (let ((profiling (or (contrib-variable "SB-SPROF" "*PROFILING*")
                                (fail "UNAVAILABLE" "sb-sprof has no *PROFILING* on this SBCL"))))
             (when (symbol-value profiling)
               (fail "BUSY" "sb-sprof is already profiling in this image (started outside sbmon)")))
           (unless (contrib-variable "SB-SPROF" "*SAMPLES*")
             (fail "UNAVAILABLE" "sb-sprof has no *SAMPLES* on this SBCL"))
           (sprof-call "RESET")
           (unwind-protect
                (progn
                  (sprof-call "START-PROFILING" :mode mode :threads :all)
                  (sleep seconds))
             (sprof-call "STOP-PROFILING"))
           (unwind-protect
                ;; REPORT turns the raw samples into the traces MAP-TRACES walks
                (if (sprof-call "REPORT" :type nil :stream (make-broadcast-stream))
                    (profile-result mode seconds max-rows keep-runtime)
                    (list :mode mode :seconds (coerce seconds 'double-float)
                          :samples 0 :rows nil :threads nil :thread-samples nil
                          :frames nil :stacks nil :stacks-dropped 0
                          :max-stacks +profile-max-stacks+ :max-depth +profile-max-depth+
                          :runtime-frames (if keep-runtime :kept :folded)))
             (ignore-errors (sprof-call "RESET"))))
      (unregister-control-thread self)
      (setf (svref **profile-busy** 0) nil))))

;;; --- :reload-system

(defun asdf-call (name &rest args)
  (apply (or (contrib-function "ASDF" name) (fail "UNAVAILABLE" "ASDF has no function ~a" name))
         args))

(defun %load-system (name force)
  (if force
      (asdf-call "LOAD-SYSTEM" name :force t)
      (asdf-call "LOAD-SYSTEM" name)))

(defun op-reload-system (args)
  (check-plist args '(:system :force) :reload-system)
  (let ((name (string-arg args :system :reload-system :required t :max 200))
        (force (bool-arg args :force :reload-system)))
    (when (zerop (length name))
      (fail "BAD-ARGUMENT" ":system must not be empty"))
    (ensure-module :asdf "ASDF")
    (unless (asdf-call "FIND-SYSTEM" name nil)
      (fail "MISSING-SYSTEM" "ASDF cannot find a system named ~s" name))
    (let* ((out (make-bounded-output-stream +reload-output+))
           (warnings '()) (nwarnings 0)
           (t0 (mono-ns))
           (failure
             (catch 'sbmon-reload-failed
               (flet ((fail-hook (c &optional hook)
                        (declare (ignore hook))
                        (throw 'sbmon-reload-failed
                          (condition-failure c))))
                 (let ((*debugger-hook* #'fail-hook)
                       (sb-ext:*invoke-debugger-hook* #'fail-hook))
                   (with-captured-io (out)
                     (handler-bind
                         ((warning (lambda (w)
                                     (when (< nwarnings +max-warnings+)
                                       (push (safe-string (lambda (s) (princ w s)) +warning-chars+)
                                             warnings))
                                     (incf nwarnings)
                                     (muffle-warning w)))
                          (serious-condition #'fail-hook))
                       (%load-system name force)))))
               nil))
           (output (list :output (bounded-text out) :output-truncated (bounded-truncated out)))
           (warnings (reverse warnings)))
      (when failure
        (destructuring-bind (type message frames) failure
          (fail-with type (list* :backtrace frames :warnings warnings output) "~a" message)))
      (list* :system name :forced force :seconds (seconds-since t0)
             :warnings warnings output))))


(note-part-loaded :control)

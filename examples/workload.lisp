;;;; workload.lisp -- a small demo service for sbmon to watch.
;;;;
;;;; Run (from the repository root):
;;;;   sbcl --load lisp/sbmon-agent.lisp --load examples/workload.lisp
;;;;
;;;; It starts four worker threads (worker-1 .. worker-4) that contend for a mutex named
;;;; "shared-state", allocate a few MB/s (so nursery GCs happen about every second) and
;;;; sleep a little; a thread named "idle-listener" that waits on a semaphore; then it
;;;; starts the agent on its default Unix socket, prints
;;;;   sbmon-agent listening on ADDRESS
;;;; and keeps the image alive until it is killed.

(defpackage #:sbmon-workload
  (:use #:common-lisp))

(in-package #:sbmon-workload)

(defvar *shared-state* (sb-thread:make-mutex :name "shared-state"))
(defvar *wakeup* (sb-thread:make-semaphore :name "idle-wakeup"))
(defvar *counter* 0)
(defvar *sink* nil "Keeps the latest garbage reachable for a moment.")

(defun churn (bytes)
  "Allocate about BYTES of short-lived lists and vectors."
  (let ((made 0))
    (loop while (< made bytes)
          do (setf *sink* (make-list 256))                          ; 4 KiB of conses
             (setf *sink* (make-array 512 :element-type 'fixnum))  ; 4 KiB vector
             (incf made 8192))))

(defun worker-loop (index)
  "Body of worker INDEX: forever take the lock, allocate, release, allocate, nap."
  (declare (ignorable index))
  (let ((*random-state* (make-random-state t)))   ; one random state per thread
    (loop
      (sb-thread:with-mutex (*shared-state*)
        (incf *counter*)
        (churn 65536)
        (sleep (/ (+ 2 (random 4)) 1000)))      ; hold the lock 2-5 ms
      (churn (* 128 1024))                       ; 128 KiB outside the lock
      (sleep (/ (+ 1 (random 3)) 1000)))))       ; 1-3 ms: the lock stays contended

(defun idle-listener ()
  (loop (sb-thread:wait-on-semaphore *wakeup*)))

(defvar *threads*
  (append
   (loop for i from 1 to 4
         collect (let ((i i))
                   (sb-thread:make-thread (lambda () (worker-loop i))
                                          :name (format nil "worker-~d" i))))
   (list (sb-thread:make-thread #'idle-listener :name "idle-listener"))))

(let ((address (sbmon-agent:start)))
  (format *standard-output* "~&sbmon-agent listening on ~a~%" address)
  (finish-output *standard-output*))

(loop (sleep 3600))
